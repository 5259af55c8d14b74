"""The margin diagnostic: how a method moves the true-class margin on samples the base model gets right
and on samples it gets wrong.

The true-class margin of one sample is z_y − max_{k≠y} z_k, with z the model's outputs (the logits the
evaluation's metrics are computed from, before any softmax) and y the label; it is positive exactly when
the sample is classified correctly (ties aside). A method that only sharpens the base model's own
prediction raises the margin on correct samples and lowers it on wrong ones: it can lower cross-entropy
where the base model is right but under-confident, yet it cannot flip a wrong prediction, which would
need the margin of a wrong sample to rise above 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["Group", "MarginMeter", "true_class_margin"]


class Group:
    """The keys of one row of `EvaluationReport.margins`: the samples the base model classifies
    correctly (argmax = label) and those it gets wrong."""

    CORRECT = "correct"
    WRONG = "wrong"


def true_class_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample: the true class's logit minus the largest other logit (float64).

    Args:
        logits: model outputs, `[N, C]` with C >= 2.
        targets: class indices, `[N]`.
    """
    z = logits.detach().double()
    y = targets.long().reshape(-1, 1).to(z.device)
    true = z.gather(1, y).squeeze(1)
    others = z.scatter(1, y, -math.inf).max(1).values
    return true - others


def _stats(change: torch.Tensor, base: torch.Tensor) -> dict[str, Any]:
    """n, the mean base margin, and the mean change with its standard error (None where undefined)."""
    n = len(change)
    return {
        "n": n,
        "base_margin": float(base.mean()) if n else None,
        "mean_change": float(change.mean()) if n else None,
        "se": float(change.std(unbiased=True) / math.sqrt(n)) if n > 1 else None,
    }


class MarginMeter:
    """Accumulates, batch by batch, each method's change in the true-class margin against the base model's."""

    def __init__(self) -> None:
        self.base: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.changes: dict[str, list[torch.Tensor]] = {}

    def add_base(self, base_out: torch.Tensor, targets: torch.Tensor) -> None:
        """Record one batch's base outputs; call it before `add` for that batch.

        Args:
            base_out: the base model's logits.
            targets: class indices.
        """
        self.base.append(true_class_margin(base_out, targets).cpu())
        self.correct.append((base_out.detach().argmax(-1) == targets.to(base_out.device)).cpu())

    def add(self, row: str, out: torch.Tensor, targets: torch.Tensor) -> None:
        """Record one method's outputs on the batch last given to `add_base`.

        Args:
            row: the method's label (an `ocd_hf.evaluation.Row`).
            out: its logits on that batch.
            targets: class indices.
        """
        self.changes.setdefault(row, []).append(true_class_margin(out, targets).cpu() - self.base[-1])

    def result(self) -> dict[str, dict[str, dict[str, Any]]]:
        """row -> group (`Group.CORRECT`, `Group.WRONG`) -> {"n", "base_margin", "mean_change", "se"}."""
        if not self.base:
            return {}
        base, correct = torch.cat(self.base), torch.cat(self.correct)
        out = {}
        for row, parts in self.changes.items():
            change = torch.cat(parts)
            out[row] = {
                Group.CORRECT: _stats(change[correct], base[correct]),
                Group.WRONG: _stats(change[~correct], base[~correct]),
            }
        return out
