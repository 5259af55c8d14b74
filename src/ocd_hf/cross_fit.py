"""Cross-fitting: out-of-fold deltas on the base model's own training set.

Deltas carry the base model's real errors only on samples it was not trained on. Cross-fitting splits
the data into K folds and collects fold k with a base model retrained on the other folds, so every
delta is out-of-sample. The wrapped model's weights are swapped in and out and always restored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .collection import DeltaStore
from .integrations import get_adapter


def fold_indices(n: int, num_folds: int, seed: int) -> list[list[int]]:
    """A seeded split of range(n) into `num_folds` folds of (nearly) equal size."""
    if not 2 <= num_folds <= n:
        raise ValueError(f"num_folds must be between 2 and the dataset size ({n}); got {num_folds}.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[k::num_folds]) for k in range(num_folds)]


def cross_fit_collect(
    module: nn.Module,
    dataset: Dataset,
    root: Path,
    train_fn: Callable[[Any], Any],
    collect_fold: Callable[[Any, Path], None],
    *,
    num_folds: int,
    seed: int,
    process_index: int = 0,
    num_processes: int = 1,
) -> list[Path]:
    """Collect every fold into `root/fold-k` with a base model trained on the other folds.

    Args:
        module: The wrapped model's module; its weights are replaced per fold and restored at the end.
        dataset: The data to collect on (an HF dataset keeps its type in the folds).
        root: Folder of the fold collections; finished folds are skipped on a rerun.
        train_fn: `train_fn(subset) -> model` (or its state dict), trained the way the wrapped one was.
        collect_fold: `collect_fold(subset, folder)` collects one fold with the current weights.
        num_folds: K.
        seed: Seeds the split.
        process_index: This process's rank; folds are shared out between processes.
        num_processes: Number of processes.

    Returns:
        The K fold folders (read together with `DeltaStore(paths)`).
    """
    folds = fold_indices(len(dataset), num_folds, seed)
    paths = [root / f"fold-{k}" for k in range(num_folds)]
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    try:
        for k in range(process_index, num_folds, num_processes):
            if _complete(paths[k]):  # resume: this fold's base model need not be retrained
                continue
            rest = [i for j, f in enumerate(folds) if j != k for i in f]
            fitted = train_fn(_subset(dataset, rest))
            if not isinstance(fitted, dict):
                fitted = get_adapter(fitted).module.state_dict()
            module.load_state_dict(fitted)
            collect_fold(_subset(dataset, folds[k]), paths[k])
    finally:
        module.load_state_dict(original)
    return paths


def _subset(dataset: Any, indices: list[int]) -> Any:
    # HF datasets keep their own type (trainers such as SetFit's expect one); anything else is a Subset
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return dataset.select(indices)
    return Subset(dataset, indices)


def _complete(folder: Path) -> bool:
    try:
        DeltaStore(folder)
    except (FileNotFoundError, ValueError):
        return False
    return True
