"""Combining the outputs of several weight draws into one prediction."""

from __future__ import annotations

import torch

ENSEMBLES = ("probs", "mean_weights", "outputs")


def combine_draws(outs: torch.Tensor, task: str | None) -> torch.Tensor:
    """Combine the outputs of S draws.

    Args:
        outs: [S, B, ...] outputs, one per draw.
        task: "classification" averages class probabilities (returns the log of the mean probability);
            anything else averages the outputs.

    Returns:
        [B, ...] combined outputs.
    """
    if task == "classification":
        return outs.log_softmax(-1).exp().mean(0).log()
    return outs.mean(0)
