"""`OCDTrainingArguments`: how `OCDTrainer` collects, trains and calibrates (never saved with the head)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .calibration import DEFAULT_GRID, CalibrationRule
from .config import ConfigError, check_fields
from .memory import parse_memory

# Keys that OCDConfig held before the split; `from_pretrained(model, layer=..., num_train_steps=...)` still
# accepts them (with a FutureWarning) and routes them here.
LEGACY_CONFIG_KEYS = ("learning_rate", "train_batch_size", "num_train_steps", "ema_decay", "max_grad_norm", "seed")


@dataclass
class OCDTrainingArguments:
    """Arguments of the training loop, in the style of transformers' `TrainingArguments`.

    Args:
        num_train_steps: Optimizer steps of the head (denoiser and scale net together).
        learning_rate: AdamW learning rate (cosine schedule with warm-up).
        train_batch_size: Deltas per training step.
        ema_decay: Decay of the EMA weights that the trained head keeps.
        max_grad_norm: Gradient clipping.
        seed: Seeds head initialisation, batch order, fold split and calibration draws.
        collect_batch_size: Samples overfitted together while collecting deltas.
        collect_dir: Where the deltas are streamed (kept, and resumed on a rerun); a temporary folder
            (shared by all processes) when None.
        output_dir: Where training checkpoints go (resume after a kill); none are written when None.
        shard_size: Samples per collection shard.
        max_memory: Memory budget of collection, in bytes or as "8GiB" / "500MB": each collection batch is
            overfitted in chunks that fit it (the deltas do not change). None: half of the memory available
            when collection starts (free GPU memory on CUDA).
        resume: Resume collection and training from what `collect_dir` / `output_dir` already hold.
        num_folds: Folds of cross-fitted collection (with `OCDTrainer(cross_fit=train_fn)`).
        calibration_grid: `delta_scale` values tried on the evaluation set (0, the base model, is always added).
        calibration_min_gain_se: A value is kept only if it beats the base model by this many standard
            errors of the paired per-sample loss difference (k of `ocd_hf.calibration.choose_scale`; 1 since
            the rule comparison of docs/findings.md, 2 before).
        calibration_rule: "se" (the best value, kept if its gain exceeds k SE) or "shrinkage" (every
            value's gain shrunk by k of its SE, the largest kept if positive).
        calibration_batch_size: Batch size of calibration.
        checkpoint_every: Steps between training checkpoints (with `output_dir`).
        save_total_limit: Training checkpoints kept (the newest ones); None keeps all. Two leave a
            complete fallback when the newest is damaged.
        progress: Show tqdm progress bars (main process only).
        early_stopping_patience: Stop head training once the held-out denoising loss has not improved for
            this many evaluations; None trains all `num_train_steps` (nothing is held out).
        eval_every: Steps between held-out evaluations (with `early_stopping_patience`).
        eval_size: Collected samples held out of head training for those evaluations (at most a tenth
            of the collection).
    """

    num_train_steps: int = 2000
    learning_rate: float = 1e-3
    train_batch_size: int = 64
    ema_decay: float = 0.995
    max_grad_norm: float = 1.0
    seed: int = 0
    collect_batch_size: int = 64
    collect_dir: str | None = None
    output_dir: str | None = None
    shard_size: int = 4096
    max_memory: int | str | None = None
    resume: bool = True
    num_folds: int = 5
    calibration_grid: tuple[float, ...] = DEFAULT_GRID
    calibration_min_gain_se: float = 1.0
    calibration_rule: CalibrationRule = "se"
    calibration_batch_size: int = 256
    checkpoint_every: int = 500
    save_total_limit: int | None = 2
    progress: bool = True
    early_stopping_patience: int | None = None
    eval_every: int = 100
    eval_size: int = 128

    def __post_init__(self) -> None:
        for k in ("collect_dir", "output_dir"):
            if isinstance(getattr(self, k), os.PathLike):
                setattr(self, k, os.fspath(getattr(self, k)))
        self.calibration_grid = tuple(float(g) for g in self.calibration_grid)
        check_fields(self)
        positive = (
            "num_train_steps",
            "learning_rate",
            "train_batch_size",
            "collect_batch_size",
            "shard_size",
            "eval_every",
            "eval_size",
        )
        bad = [k for k in positive if not getattr(self, k) > 0]
        if not 0 <= self.ema_decay < 1:
            bad.append("ema_decay")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            bad.append("save_total_limit")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            bad.append("early_stopping_patience")
        if self.num_folds < 2:
            bad.append("num_folds")
        if any(g < 0 for g in self.calibration_grid):
            bad.append("calibration_grid")
        if self.max_memory is not None:
            try:
                parse_memory(self.max_memory)
            except ValueError as e:
                raise ConfigError(f"OCDTrainingArguments.{e}") from None
        if bad:
            raise ConfigError(
                f"OCDTrainingArguments.{bad[0]}={getattr(self, bad[0])!r} is out of range "
                "(sizes, steps and rates > 0; ema_decay in [0, 1); num_folds >= 2; save_total_limit and "
                "early_stopping_patience >= 1 or None; grid values >= 0)."
            )

    def replace(self, **changes: Any) -> OCDTrainingArguments:
        return dataclasses.replace(self, **changes)


def pop_legacy_keys(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the pre-0.2 OCDConfig training keys from `kwargs` (with a FutureWarning) and return them."""
    legacy = {k: kwargs.pop(k) for k in LEGACY_CONFIG_KEYS if k in kwargs}
    if legacy:
        warnings.warn(
            f"{sorted(legacy)} are training arguments now, not OCDConfig fields: pass them to fit(...) or "
            "OCDTrainingArguments. Accepting them here will be removed in ocd_hf 0.3.",
            FutureWarning,
            stacklevel=3,
        )
    return legacy
