"""Capture of the conditioning I(x) = [i_L(x), a_L(x), f(x)] from the unmodified forward pass.

Pooling rule (documented in docs/concepts.md): every captured tensor becomes one vector per sample.
For Linear / transformers Conv1D layers and for model outputs the feature dimension is the last one and
all dimensions between batch and features (tokens, patches) are averaged. For Conv layers the
feature dimension is the channel dimension (dim 1) and the spatial dimensions are averaged.
This is the default conditioner, `ocd_hf.conditioner.MeanPool`; another conditioner works on the raw
tensors (`capture_layer(..., keep_raw=True)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn


def pool(t: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """[B, ..., D] -> [B, D] (mean over the middle dims); channels_first: [B, C, ...] -> [B, C]."""
    t = t.detach()
    if t.dim() == 1:
        return t[:, None]
    if t.dim() == 2:
        return t
    if channels_first:
        return t.flatten(2).mean(dim=2)
    return t.flatten(1, -2).mean(dim=1)


def is_channels_first(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


@dataclass
class Captured:
    """What the hooks saw in the last forward: pooled layer input and layer output, [B, d] each."""

    layer_input: torch.Tensor | None = None
    layer_output: torch.Tensor | None = None
    input_ndim: int | None = None
    channels_first: bool = False
    # the unpooled input and output (keep_raw=True), for a conditioner other than the mean (ocd_hf.conditioner)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)


@contextlib.contextmanager
def capture_layer(module: nn.Module, keep_raw: bool = False) -> Iterator[Captured]:
    """Record the (pooled) input and output of `module` during the forwards run inside the block.

    With `keep_raw`, also the unpooled tensors (detached), for `ocd_hf.conditioner.condition`.

    The hook never changes the output; it is removed on exit, also when the forward raises.
    """
    channels_first = is_channels_first(module)
    captured = Captured(channels_first=channels_first)

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured.layer_input = pool(inputs[0], channels_first)
        captured.layer_output = pool(output, channels_first)
        captured.input_ndim = inputs[0].dim()
        if keep_raw:
            captured.raw = {"input": inputs[0].detach(), "output": output.detach()}

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


class Conditioning(NamedTuple):
    """I(x): pooled layer input i_L, layer output a_L and model output f(x), each [B, d]."""

    layer_input: torch.Tensor
    layer_output: torch.Tensor
    model_output: torch.Tensor
