"""Health checks at inference: is the conditioning usable, and are sampled Ω_0 inside the training
targets' range?

A collapsed denoiser (e.g. ε-prediction on small data) samples Ω_0 with std 50-150 where the targets
Δ/ρ have std ≈ 1; deltas built from them wreck the model. `check_samples` catches it at generation time.
Before that, `check_conditioning` blames the input, not the head, for rows the model itself turns into
NaN or inf, and refuses a model whose output has another width than the one the head was trained on.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .capture import Conditioning

# Healthy x0-denoisers and collapsed ones sample spreads far apart (docs/concepts.md, "Sampling health
# checks"; docs/findings.md): a factor of 2 separates the two with room on both sides.
HEALTHY_RATIO = (0.5, 2.0)


@dataclass
class SampleHealth:
    """Spread of sampled Ω_0 against the training targets'."""

    omega_std: float
    target_std: float | None

    @property
    def ratio(self) -> float:
        return self.omega_std / self.target_std if self.target_std else float("nan")

    @property
    def ok(self) -> bool:
        return math.isnan(self.ratio) or HEALTHY_RATIO[0] <= self.ratio <= HEALTHY_RATIO[1]


def all_finite(t: torch.Tensor) -> bool:
    """`torch.isfinite(t).all()`, from the extremes: NaN propagates into min and max, ±inf is one of them.

    One reduction instead of a boolean tensor of t's size and a second reduction over it.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_samples(omega: torch.Tensor, target_std: float | None) -> SampleHealth:
    """Raise on non-finite Ω_0; warn when their std is off the training targets' by more than 2x."""
    if not all_finite(omega):
        raise FloatingPointError(
            "The head generated non-finite deltas; it has likely diverged (retrain it with a lower learning_rate)."
        )
    health = SampleHealth(float(omega.float().std()) if omega.numel() > 1 else 0.0, target_std)
    if not health.ok:
        warnings.warn(
            f"Sampled deltas have std {health.omega_std:.3g} while the training targets had {target_std:.3g} "
            f"({health.ratio:.2g}x): the denoiser's samples leave the training range. A short or small head is "
            "the usual cause: train it longer (num_train_steps); otherwise lower guidance_scale, or use "
            "prediction_type='sample' (the stable one) if the head predicts epsilon.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return health


_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def user_stacklevel() -> int:
    """The `stacklevel` that points a warning at the first caller outside ocd_hf and torch (decorators such
    as torch.no_grad add frames, so no fixed number is right for every entry point)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


_COND_PARTS = {"layer_input": "target layer's input", "layer_output": "target layer's output", "model_output": "output"}


def check_conditioning(cond: Conditioning, shapes: Any = None) -> Conditioning:
    """Return `cond` after checking it against the head's shapes and for non-finite rows.

    Args:
        cond: I(x) of one batch, from the unmodified model.
        shapes: The head's `HeadShapes` (None before a head exists: only the finiteness check runs).

    Raises:
        ValueError: The model's output width differs from training (another base model or classifier),
            or some rows hold NaN / inf (named by their position in the batch).
    """
    out = cond.model_output
    if shapes is not None and out.shape[-1] != shapes.output_dim:
        raise ValueError(
            f"The model's output has {out.shape[-1]} values per sample, but the head was trained on a model "
            f"with {shapes.output_dim}: it belongs to another base model (or another classifier head). Load the "
            "base model the head was trained for."
        )
    bad: dict[int, list[str]] = {}
    if all(all_finite(getattr(cond, key)) for key in _COND_PARTS):
        return cond  # the usual case, found without a per-row pass
    for key, what in _COND_PARTS.items():
        t = getattr(cond, key).reshape(getattr(cond, key).shape[0], -1)
        # -inf logits (masked classes) are a legitimate model output; normalisation clips them
        finite = (~torch.isnan(t)).all(1) if key == "model_output" else torch.isfinite(t).all(1)
        for row in (~finite).nonzero().flatten().tolist():
            bad.setdefault(row, []).append(what)
    if bad:
        rows = sorted(bad)
        where = ", ".join(f"{r} ({' and '.join(bad[r])})" for r in rows[:10]) + (" …" if len(rows) > 10 else "")
        raise ValueError(
            f"{len(rows)} of {out.shape[0]} inputs in this batch give non-finite values (NaN or inf) in the base "
            f"model, at batch rows {where}. The inputs hold NaN / inf or overflow the model; the head is not at "
            "fault. Clean or drop those rows."
        )
    return cond
