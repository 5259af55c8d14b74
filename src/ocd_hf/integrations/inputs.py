"""Checks on what users pass to a wrapper, each failing with one sentence that names the fix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..health import all_finite


def reject_with_pretrained(**given: Any) -> None:
    """`from_pretrained(model, head, ...)` fixes the layer and settings: refuse the keywords of a new head."""
    names = [k for k, v in given.items() if v is not None]
    if names:
        raise ValueError(
            f"{names} cannot be combined with a pretrained head: the head fixes its layer and settings "
            "(see its ocd_config.json). Drop them, or build a new head without pretrained_head."
        )


def check_resolved(layer: Any) -> None:
    """A wrapper with layer="auto" has no layer to run until selection chose one."""
    if layer is None:
        raise RuntimeError(
            "This OCDWrapper was built with layer='auto' and has no layer yet: call fit(train_dataset) or "
            "select_layer(batch) first (they choose the layer), or build it with layer='<name>'."
        )


def check_call(layer: Any, num_samples: int) -> None:
    """The arguments of `OCDWrapper.forward`: a resolved layer and at least one draw."""
    check_resolved(layer)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: pass a whole number >= 1 of weight draws per input.")


def _rows(t: torch.Tensor) -> list[int]:
    if all_finite(t):  # the usual case, without a per-row pass
        return []
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten().tolist()


def _tensors(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if isinstance(inputs, (list, tuple)):
        return [v for v in inputs if isinstance(v, torch.Tensor)]
    return []


def check_batch(inputs: Any, layer_input: torch.Tensor | None, output: torch.Tensor) -> None:
    """After the plain forward of `conditioning`: one unbatched sample, and NaN / inf in the inputs.

    Args:
        inputs: What the user passed (after the adapter prepared it).
        layer_input: The target layer's pooled input [B, d].
        output: The model's output f(x).
    """
    if layer_input is None:
        raise RuntimeError("The target layer did not run in the model's forward: is it used for these inputs?")
    if output.dim() == 0 or layer_input.shape[0] != output.shape[0]:
        raise ValueError(
            f"The inputs look like one unbatched sample (the layer saw {layer_input.shape[0]} rows, the model "
            f"returned shape {tuple(output.shape)}): add a batch dimension, e.g. ocd(x.unsqueeze(0))."
        )
    n = output.shape[0]
    for t in _tensors(inputs):
        if t.is_floating_point() and t.dim() >= 1 and t.shape[0] == n and _rows(t):
            raise ValueError(
                f"Input rows {_rows(t)[:10]} contain NaN or inf: the model cannot run on them. Drop or impute "
                "those rows before calling the wrapper."
            )
    if output.is_floating_point() and _rows(output):
        raise ValueError(
            f"The base model's output is NaN or inf for input rows {_rows(output)[:10]} (before any generated "
            "weights): check those inputs."
        )
