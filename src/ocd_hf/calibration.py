"""Calibration: choosing `delta_scale` on held-out data so that a shipped head does not make the base
model worse there."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .losses import LossFn
from .prefix import reuse_prefix


@torch.no_grad()
def calibrate(
    ocd: Any,
    dataset: Dataset,
    loss_fn: LossFn,
    *,
    grid: tuple[float, ...],
    min_gain_se: float,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every `delta_scale` in `grid` on `dataset` and pick one.

    Each grid value scales the same generated deltas; the one with the lowest mean loss wins, but only if
    it beats the base model (delta_scale 0) by `min_gain_se` standard errors of the paired per-sample
    loss difference, else 0: a head that does not help on validation is switched off instead of shipped.

    Args:
        ocd: A fitted `OCDWrapper`.
        dataset: Labelled data the base model was not trained on.
        loss_fn: Per-sample loss ([B]).
        grid: Values to try (0 is always added).
        min_gain_se: Required gain over the base model, in standard errors.
        batch_size: Batch size of the pass over `dataset`.
        seed: Seeds the generated deltas.
        progress: Show a progress bar.

    Returns:
        The record kept in `FittedState.calibration`: the chosen delta_scale, the mean loss per grid value,
        the best value, its gain over base and the gain's standard error.
    """
    grid = tuple(sorted({float(g) for g in grid} | {0.0}))
    gen = torch.Generator(device=ocd.device).manual_seed(seed)
    losses: dict[float, list[torch.Tensor]] = {g: [] for g in grid}
    adapter = ocd.adapter
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn())
    for batch in tqdm(loader, desc="calibrating delta_scale", disable=not progress):
        inputs, targets = adapter.split_batch(adapter.to_device(batch, ocd.device))
        with reuse_prefix(ocd.module, ocd.layer, ocd.reuse_prefix):
            cond, base_out = ocd.conditioning(inputs)
            delta = ocd.generate_deltas(cond, 1, gen, delta_scale=1.0)[0]
            for g in grid:
                out = base_out if g == 0 else ocd.forward_with_deltas(inputs, g * delta)
                losses[g].append(loss_fn(out, targets).double().cpu())
    per = {g: torch.cat(v) for g, v in losses.items()}
    mean = {g: float(v.mean()) for g, v in per.items()}
    best = min(grid, key=lambda g: (mean[g], g))
    diff = per[best] - per[0.0]
    se = float(diff.std() / max(len(diff), 1) ** 0.5) if len(diff) > 1 else float("inf")
    chosen = best if best > 0 and float(diff.mean()) < -min_gain_se * se else 0.0
    return {
        "delta_scale": chosen,
        "mean_loss": {str(g): m for g, m in mean.items()},
        "best": best,
        "gain_vs_base": -float(diff.mean()),
        "gain_se": se,
        "num_samples": len(diff),
    }
