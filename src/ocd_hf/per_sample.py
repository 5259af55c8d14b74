"""Per-sample weights inside one batched forward: sample b runs the layer with W + Δ_b.

The hook adds only the delta's contribution to the layer's normal output, so the base computation is
not repeated and gradients flow to Δ alone. Supported: nn.Linear (any number of token dims),
nn.Conv1d / nn.Conv2d (grouped convolution, groups = B·groups) and transformers' `Conv1D`
(GPT-2 style, weight stored as [in, out]).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv1D (transformers)")


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, detected without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_supported(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.padding_mode == "zeros"
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def check_supported(module: nn.Module, name: str = "layer") -> None:
    if not is_supported(module):
        extra = ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            extra = f" (padding_mode={module.padding_mode!r}; only 'zeros' is supported)"
        raise TypeError(
            f"Layer {name!r} is a {type(module).__name__}{extra}; OCD can generate weights for "
            f"{', '.join(SUPPORTED_TYPES)} layers only. Pick one of those (see OCDWrapper.candidate_layers)."
        )


def delta_output(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, delta_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The change of `module(x)` when sample b's weight becomes W + delta[b] (and bias + delta_bias[b])."""
    if x.shape[0] != delta.shape[0]:
        raise ValueError(
            f"Batch of {x.shape[0]} inputs reached the target layer but {delta.shape[0]} per-sample deltas were "
            "given; the layer's input must have the batch as its first dimension and match the deltas."
        )
    if isinstance(module, nn.Linear):
        out = torch.einsum("b...i,boi->b...o", x, delta.to(x.dtype))
        if delta_bias is not None:
            out = out + delta_bias.to(x.dtype).view(delta_bias.shape[0], *([1] * (out.dim() - 2)), -1)
        return out
    if is_hf_conv1d(module):
        out = torch.einsum("b...i,bio->b...o", x, delta.to(x.dtype))
        if delta_bias is not None:
            out = out + delta_bias.to(x.dtype).view(delta_bias.shape[0], *([1] * (out.dim() - 2)), -1)
        return out
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        b = x.shape[0]
        # One grouped convolution: the batch becomes groups so each sample meets only its own kernel.
        xg = x.reshape(1, b * x.shape[1], *x.shape[2:])
        wg = delta.to(x.dtype).reshape(b * delta.shape[1], *delta.shape[2:])
        out = conv(xg, wg, None, module.stride, module.padding, module.dilation, b * module.groups)
        out = out.reshape(b, delta.shape[1], *out.shape[2:])
        if delta_bias is not None:
            out = out + delta_bias.to(x.dtype).view(b, -1, *([1] * (out.dim() - 2)))
        return out
    check_supported(module)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def per_sample_weights(
    module: nn.Module, delta: torch.Tensor, delta_bias: torch.Tensor | None = None
) -> Iterator[None]:
    """Within the block, every forward of `module` uses W + delta[b] for batch element b.

    `delta` has shape [B, *module.weight.shape]. The hook is removed on exit, also after an error.
    """
    check_supported(module)
    if tuple(delta.shape[1:]) != tuple(module.weight.shape):
        raise ValueError(
            f"Deltas of shape {tuple(delta.shape[1:])} do not fit a layer whose weight is {tuple(module.weight.shape)}."
        )

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + delta_output(mod, inputs[0], delta, delta_bias)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
