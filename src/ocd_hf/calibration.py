"""Calibration: choosing `delta_scale` on held-out data so that a shipped head does not make the base
model worse there.

Two steps, shared by OCD's calibration and by every rival scored like it (`ocd_hf.evaluation`):
`grid_losses` scores one set of deltas at every grid value, `choose_scale` applies the selection rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .losses import LossFn
from .prefix import reuse_prefix

__all__ = ["CALIBRATION_RULES", "DEFAULT_GRID", "calibrate", "choose_scale", "grid_losses"]

DEFAULT_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
CalibrationRule = Literal["se", "shrinkage"]
CALIBRATION_RULES: tuple[str, ...] = ("se", "shrinkage")

# (inputs, conditioning, base output) -> deltas [B, *W.shape] at delta_scale 1
DeltaFn = Callable[[Any, Any, torch.Tensor], torch.Tensor]


def _paired_se(diff: torch.Tensor) -> float:
    return float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else float("inf")


def choose_scale(
    per_sample: dict[float, torch.Tensor], *, rule: str = "se", min_gain_se: float = 1.0
) -> dict[str, Any]:
    """Pick `delta_scale` from per-sample losses at every grid value (0.0, the base model, must be a key).

    Rules, with k = `min_gain_se` and gain(g) the mean paired loss drop of value g against the base model:

    - "se": the value with the lowest mean loss, kept only if its gain exceeds k standard errors of the
      paired difference, else 0 (k=1, the "1 SE" rule, is the shipped default; k=2 the stricter rule used
      before the comparison in docs/findings.md).
    - "shrinkage": each value's gain is shrunk toward 0 by k of its own standard errors; the value with the
      largest shrunk gain wins if that is positive, else 0 (argmin of mean loss + k·SE of the difference).

    Args:
        per_sample: grid value -> per-sample losses [N], the same samples in the same order for every value.
        rule: "se" or "shrinkage".
        min_gain_se: k above.

    Returns:
        The calibration record: chosen delta_scale, mean loss per grid value, the best (lowest mean loss)
        value, its gain over base and the gain's standard error, the number of samples, the rule and k.
    """
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"calibration rule {rule!r} is unknown; use one of {CALIBRATION_RULES}.")
    if 0.0 not in per_sample:
        raise ValueError("per_sample needs the base model's losses under key 0.0.")
    grid = sorted(per_sample)
    base = per_sample[0.0]
    mean = {g: float(per_sample[g].mean()) for g in grid}
    best = min(grid, key=lambda g: (mean[g], g))
    diff = per_sample[best] - base
    se = _paired_se(diff)
    if rule == "se":
        chosen = best if best > 0 and float(diff.mean()) < -min_gain_se * se else 0.0
    else:
        shrunk = {
            g: -float((per_sample[g] - base).mean()) - min_gain_se * _paired_se(per_sample[g] - base)
            for g in grid
            if g > 0
        }
        top = max(shrunk, key=lambda g: (shrunk[g], -g), default=None)
        chosen = top if top is not None and shrunk[top] > 0 else 0.0
    return {
        "delta_scale": chosen,
        "mean_loss": {str(g): m for g, m in mean.items()},
        "best": best,
        "gain_vs_base": -float(diff.mean()),
        "gain_se": se,
        "num_samples": len(diff),
        "rule": rule,
        "min_gain_se": min_gain_se,
    }


@torch.no_grad()
def grid_losses(
    ocd: Any,
    dataset: Dataset,
    loss_fn: LossFn,
    grid: tuple[float, ...],
    delta_fn: DeltaFn,
    *,
    batch_size: int = 256,
    progress: bool = True,
    desc: str = "calibrating delta_scale",
) -> dict[float, torch.Tensor]:
    """Per-sample losses on `dataset` of the deltas `delta_fn` gives, scaled by every grid value (0 added).

    Args:
        ocd: A fitted `OCDWrapper`.
        dataset: Labelled data.
        loss_fn: Per-sample loss ([B]).
        grid: Values to try.
        delta_fn: (inputs, conditioning, base output) -> deltas at delta_scale 1; runs without gradients
            (a rival that overfits enables them itself).
        batch_size: Batch size of the pass over `dataset`.
        progress: Show a progress bar.
        desc: The progress bar's label.

    Returns:
        grid value -> per-sample losses [N] (float64, CPU), 0.0 being the base model.
    """
    grid = tuple(sorted({float(g) for g in grid} | {0.0}))
    losses: dict[float, list[torch.Tensor]] = {g: [] for g in grid}
    adapter = ocd.adapter
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn())
    for batch in tqdm(loader, desc=desc, disable=not progress):
        inputs, targets = adapter.split_batch(adapter.to_device(batch, ocd.device))
        with reuse_prefix(ocd.module, ocd.layer, ocd.reuse_prefix):
            cond, base_out = ocd.conditioning(inputs)
            delta = delta_fn(inputs, cond, base_out)
            for g in grid:
                out = base_out if g == 0 else ocd.forward_with_deltas(inputs, g * delta)
                losses[g].append(loss_fn(out, targets).double().cpu())
    return {g: torch.cat(v) for g, v in losses.items()}


def calibrate(
    ocd: Any,
    dataset: Dataset,
    loss_fn: LossFn,
    *,
    grid: tuple[float, ...],
    min_gain_se: float,
    rule: str = "se",
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every `delta_scale` in `grid` on `dataset` and pick one by `rule` (see `choose_scale`).

    Each grid value scales the same generated deltas (one draw per sample). A head that does not help on
    validation is switched off (delta_scale 0) instead of shipped.

    Args:
        ocd: A fitted `OCDWrapper`.
        dataset: Labelled data the base model was not trained on.
        loss_fn: Per-sample loss ([B]).
        grid: Values to try (0 is always added).
        min_gain_se: Required gain over the base model, in standard errors (k of `choose_scale`).
        rule: "se" or "shrinkage".
        batch_size: Batch size of the pass over `dataset`.
        seed: Seeds the generated deltas.
        progress: Show a progress bar.

    Returns:
        The record kept in `FittedState.calibration` (see `choose_scale`).
    """
    gen = torch.Generator(device=ocd.device).manual_seed(seed)
    per = grid_losses(
        ocd,
        dataset,
        loss_fn,
        grid,
        lambda inputs, cond, base_out: ocd.generate_deltas(cond, 1, gen, delta_scale=1.0)[0],
        batch_size=batch_size,
        progress=progress,
    )
    return choose_scale(per, rule=rule, min_gain_se=min_gain_se)
