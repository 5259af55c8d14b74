"""The conditioner: how I(x) = (i_L, a_L, f) is made from one unmodified forward pass.

OCD conditions its head on the target layer's input i_L, its output a_L and the model's output f(x),
each one vector per sample. How a tensor with extra dimensions (tokens, patches, rays × samples, an
image) becomes that vector is the conditioner's choice:

- `MeanPool` (the default) averages every dimension between batch and features (`ocd_hf.capture.pool`).
- A subclass of `Conditioner` can pool with its own weights (read off the raw tensors, or computed from
  them) and encode the model's output (for example an image encoder on a rendered view).

The conditioner is used wherever I(x) is made: `OCDWrapper.conditioning` (inference, calibration,
evaluation) and the first, unmodified pass of per-sample overfitting (the collected columns
`layer_input`, `layer_output`, `model_output`). It is a runtime object, like a loss, passed as
`OCDWrapper.from_pretrained(model, ..., conditioner=...)`; only its `name` is saved with the head, and
loading a head made with another conditioner refuses until the same one is passed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .capture import Captured, Conditioning, capture_layer, pool

DEFAULT_NAME = "mean"


class Conditioner:
    """Makes I(x) from the raw tensors of one forward pass; subclass it and override `__call__`.

    `name` identifies the conditioning a head was trained on (saved with the head and checked at
    load): give every different conditioning its own name. `__call__` runs without gradients and must
    return three float tensors [B, d] (batch first, any widths, the same widths for every batch).
    """

    name: str = DEFAULT_NAME

    def __call__(
        self,
        layer_input: torch.Tensor,
        layer_output: torch.Tensor,
        model_output: Any,
        channels_first: bool = False,
    ) -> Conditioning:
        """I(x) of one batch.

        Args:
            layer_input: What the target layer received, [B, ..., in] ([B, C, ...] for a conv layer).
            layer_output: What it returned, [B, ..., out] ([B, C, ...] for a conv layer).
            model_output: The model's output as the adapter's forward returned it (batch first).
            channels_first: True when the layer is a conv layer (features on dim 1).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement __call__.")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class MeanPool(Conditioner):
    """The default: the mean over every dimension between batch and features (`ocd_hf.capture.pool`)."""

    name = DEFAULT_NAME

    def __call__(
        self,
        layer_input: torch.Tensor,
        layer_output: torch.Tensor,
        model_output: Any,
        channels_first: bool = False,
    ) -> Conditioning:
        return Conditioning(pool(layer_input, channels_first), pool(layer_output, channels_first), pool(model_output))


def resolve_conditioner(conditioner: Conditioner | None) -> Conditioner:
    """`conditioner`, or `MeanPool()` for None; refuses anything that is not a `Conditioner`."""
    if conditioner is None:
        return MeanPool()
    if not isinstance(conditioner, Conditioner):
        raise TypeError(
            f"conditioner={conditioner!r} is not an ocd_hf.Conditioner; subclass ocd_hf.Conditioner "
            "(set `name`, implement __call__) or leave it out for the default mean pooling."
        )
    if not isinstance(conditioner.name, str) or not conditioner.name:
        raise ValueError(f"{type(conditioner).__name__}.name={conditioner.name!r}: give the conditioner a name.")
    return conditioner


def keeps_raw(conditioner: Conditioner) -> bool:
    """Whether the capture must keep the layer's raw input and output for `conditioner`.

    `MeanPool` is computed inside the capture hook (`ocd_hf.capture.capture_layer` pools there), so no
    activation outlives the layer's call; any other conditioner needs the raw tensors.
    """
    return type(conditioner) is not MeanPool


@torch.no_grad()
def condition(conditioner: Conditioner, cap: Captured, model_output: Any) -> Conditioning:
    """I(x) from what `capture_layer(layer, keep_raw=keeps_raw(conditioner))` saw and the model's output.

    Raises:
        ValueError: The conditioner returned something other than three [B, d] float tensors.
    """
    if not keeps_raw(conditioner):
        return Conditioning(cap.layer_input, cap.layer_output, pool(model_output))
    if not cap.raw:
        raise RuntimeError("The capture kept no raw tensors: use capture_layer(layer, keep_raw=True).")
    parts = conditioner(cap.raw["input"], cap.raw["output"], model_output, cap.channels_first)
    batch = cap.raw["input"].shape[0]
    if not isinstance(parts, tuple) or len(parts) != 3:
        raise ValueError(
            f"Conditioner {conditioner.name!r} returned {type(parts).__name__}; return "
            "Conditioning(layer_input, layer_output, model_output), each [B, d]."
        )
    for key, t in zip(Conditioning._fields, parts):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 and t.shape[0] == batch):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"Conditioner {conditioner.name!r} returned {key} of shape {got}; each part must be a float "
                f"tensor [B, d] with B = {batch}, the batch size."
            )
    return Conditioning(*(t.detach() for t in parts))


def first_pass(
    conditioner: Conditioner, layer: torch.nn.Module, forward: Callable[[], Any]
) -> tuple[Any, Conditioning, Captured]:
    """Run `forward()` once with `layer` captured: its output, I(x), and the capture (raw tensors dropped).

    The first, unmodified pass of an overfitting loop: I(x) comes from it for free, and the output keeps
    its graph for the loss. The raw activations are released here, since nothing needs them past I(x).
    """
    with capture_layer(layer, keep_raw=keeps_raw(conditioner)) as cap:
        out = forward()
    cond = condition(conditioner, cap, out)
    cap.raw.clear()
    return out, cond, cap


def check_collection(made_by: str | None, conditioner: Conditioner) -> None:
    """Refuse to train a head for `conditioner` on a collection whose I(x) another conditioner made.

    Args:
        made_by: The collection manifest's "conditioner" (absent, i.e. None, for the mean pooling).
        conditioner: The wrapper's conditioner.
    """
    made_by = made_by or DEFAULT_NAME
    if made_by != conditioner.name:
        raise ValueError(
            f"The collection's I(x) was made by conditioner {made_by!r} but this wrapper uses "
            f"{conditioner.name!r}: collect again, or pass the same conditioner to from_pretrained."
        )


def check_name(saved: str | None, conditioner: Conditioner | None, where: str) -> Conditioner:
    """The conditioner to use with a head saved with conditioner `saved` (None: before conditioners).

    Raises:
        ValueError: `conditioner` (or the default, when None) is not the one the head was trained on.
    """
    saved = saved or DEFAULT_NAME
    used = resolve_conditioner(conditioner)
    if used.name != saved:
        fix = (
            f"pass the same conditioner: OCDWrapper.from_pretrained(model, {where!r}, conditioner=...) with a "
            f"conditioner named {saved!r}"
            if saved != DEFAULT_NAME
            else "leave conditioner out (the default mean pooling) or pass one named 'mean'"
        )
        raise ValueError(
            f"The head at {where} was trained on conditioning {saved!r}, but this call uses {used.name!r}; "
            f"its I(x) would be read wrongly. Fix: {fix}."
        )
    return used
