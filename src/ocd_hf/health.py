"""Sampling health checks: are sampled Ω_0 inside the training targets' range?

A collapsed denoiser (e.g. ε-prediction on small data) samples Ω_0 with std 50-150 where the targets
Δ/ρ have std ≈ 1; deltas built from them wreck the model. This check catches it at generation time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

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


def check_samples(omega: torch.Tensor, target_std: float | None) -> SampleHealth:
    """Raise on non-finite Ω_0; warn when their std is off the training targets' by more than 2x."""
    if not bool(torch.isfinite(omega).all()):
        raise FloatingPointError(
            "The head generated non-finite deltas; it has likely diverged (retrain it with a lower learning_rate)."
        )
    health = SampleHealth(float(omega.float().std()) if omega.numel() > 1 else 0.0, target_std)
    if not health.ok:
        warnings.warn(
            f"Sampled deltas have std {health.omega_std:.3g} while the training targets had {target_std:.3g} "
            f"({health.ratio:.2g}x): the denoiser's samples leave the training range. Check prediction_type "
            "('sample' is the stable one), train the head longer, or lower guidance_scale.",
            RuntimeWarning,
            stacklevel=3,
        )
    return health
