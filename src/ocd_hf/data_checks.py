"""Checks on the data a head is trained on: labels that cannot mean what the loss assumes, rows that are
NaN / inf, and conditioning outliers that would wreck the normalisation statistics. Errors and warnings
name dataset indices, not positions in a batch."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from .losses import cross_entropy

IGNORE_INDEX = -100
# A row whose conditioning vector is this many times longer than the median row's is an outlier: clean
# data stays within a few times the median, a mis-scaled row (e.g. pixels in 0-255 among 0-1) is far out.
OUTLIER_RATIO = 20.0
# More outliers than this fraction is no longer "a few bad rows": the statistics then keep every row.
MAX_EXCLUDED = 0.1
COND_KEYS = ("layer_input", "layer_output", "model_output")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)


def check_batch(inputs: Any, targets: torch.Tensor, loss_fn: Any, start: int) -> list[int]:
    """Refuse a batch with non-finite inputs or labels the loss would misread; returns the dataset indices
    of samples labelled with cross_entropy's ignore_index (their loss, hence their delta, is zero).

    Args:
        inputs: The batch's inputs (a tensor, or a dict / tuple of them; other values are not checked).
        targets: The batch's labels.
        loss_fn: The per-sample loss.
        start: Dataset index of the batch's first sample (batches are taken in order).
    """
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else []
    if isinstance(inputs, dict):
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    elif isinstance(inputs, (list, tuple)):
        tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
    bad: set[int] = set()
    for t in [*tensors, targets] if isinstance(targets, torch.Tensor) else tensors:
        if t.is_floating_point() and t.dim() > 0:
            bad |= set((~torch.isfinite(_rows(t))).any(1).nonzero().flatten().tolist())
    if bad:
        rows = [start + i for i in sorted(bad)]
        raise ValueError(
            f"Dataset indices {rows[:10]}{' …' if len(rows) > 10 else ''} hold NaN or inf in their inputs or "
            "labels; clean or drop those rows before collecting."
        )
    if loss_fn is not cross_entropy or not isinstance(targets, torch.Tensor):
        return []
    if targets.is_floating_point():
        if targets.dim() == 2:
            return []  # soft labels [B, C]; cross_entropy checks C against the logits
        frac = (targets != targets.round()).reshape(-1).nonzero().flatten().tolist()
        rows = [start + i for i in frac] or list(range(start, start + min(len(targets), 10)))
        raise ValueError(
            f"cross_entropy got float labels of shape {tuple(targets.shape)} (dataset indices {rows[:10]}); they "
            "would be truncated to class ids. Pass integer class labels, soft labels of shape [B, num_classes], "
            "or loss='mse' for regression."
        )
    return [start + i for i in (targets.reshape(-1) == IGNORE_INDEX).nonzero().flatten().tolist()]


def warn_ignored(rows: list[int], n: int) -> None:
    """Say how many of `n` samples were labelled with ignore_index, and which."""
    if rows:
        warnings.warn(
            f"{len(rows)} of {n} samples are labelled {IGNORE_INDEX} (cross_entropy's ignore_index) at dataset "
            f"indices {_show(rows)}: they have no loss, so their deltas are zero; head training skips them.",
            RuntimeWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------- outliers
def conditioning_outliers(store: Any, ratio: float = OUTLIER_RATIO, chunk: int = 4096) -> dict[str, list[int]]:
    """Dataset indices of rows whose conditioning vector (per key) is `ratio` times longer than the median row's."""
    out: dict[str, list[int]] = {}
    n = len(store)
    for key in COND_KEYS:
        norms = np.concatenate(
            [
                _rows(store.get_batch(np.arange(s, min(s + chunk, n)))[key].double()).norm(dim=1).numpy()
                for s in range(0, n, chunk)
            ]
        )
        med = float(np.median(norms))
        far = np.nonzero(~np.isfinite(norms) | (norms > ratio * max(med, 1e-12)))[0]
        if far.size:
            out[key] = [int(i) for i in far]
    return out


class RobustStatistics:
    """A `DeltaStore` whose conditioning statistics (`mean`, `std`) leave out outlier rows.

    With no outliers every call goes to the store unchanged, so the statistics are bit-identical to the
    store's own. With outliers, a warning names their dataset indices.

    Args:
        store: The collection.
        ratio: See `conditioning_outliers`.
    """

    def __init__(self, store: Any, ratio: float = OUTLIER_RATIO):
        self.store = store
        found = conditioning_outliers(store, ratio)
        self.excluded = sorted({i for rows in found.values() for i in rows})
        if len(self.excluded) > MAX_EXCLUDED * len(store):
            warnings.warn(
                f"{len(self.excluded)} of {len(store)} collected samples have conditioning vectors over {ratio:g}x "
                "longer than the median sample's: the data mixes scales. They are kept in the statistics.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.excluded = []
        if self.excluded:
            index = store.get_batch(self.excluded)["index"].tolist()
            parts = ", ".join(
                f"{k} at dataset indices {_show([index[self.excluded.index(i)] for i in v])}" for k, v in found.items()
            )
            warnings.warn(
                f"{len(self.excluded)} of {len(store)} collected samples have conditioning vectors over {ratio:g}x "
                f"longer than the median sample's ({parts}). They are left out of the normalisation statistics; "
                "check those rows (mis-scaled or corrupted inputs?).",
                RuntimeWarning,
                stacklevel=3,
            )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def __len__(self) -> int:
        return len(self.store)

    def _kept(self, key: str, chunk: int = 4096):
        keep = np.setdiff1d(np.arange(len(self.store)), np.asarray(self.excluded, dtype=np.int64))
        for s in range(0, len(keep), chunk):
            yield self.store.get_batch(keep[s : s + chunk])[key].double()

    def mean(self, key: str, chunk: int = 4096) -> torch.Tensor:
        if not self.excluded or key not in COND_KEYS:
            return self.store.mean(key, chunk)
        parts = list(self._kept(key, chunk))
        return (sum(p.sum(0) for p in parts) / sum(len(p) for p in parts)).float()

    def std(self, key: str, chunk: int = 4096) -> torch.Tensor:
        if not self.excluded or key not in COND_KEYS:
            return self.store.std(key, chunk)
        mean = self.mean(key, chunk).double()
        parts = list(self._kept(key, chunk))
        count = sum(len(p) for p in parts)
        return (sum((p - mean).pow(2).sum(0) for p in parts) / max(count - 1, 1)).sqrt().float()


def _show(rows: list[int]) -> str:
    return str(rows[:10]) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
