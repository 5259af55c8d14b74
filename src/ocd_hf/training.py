"""Training of the OCD head on collected deltas, on accelerate.

The same code runs under `python` and `accelerate launch`: batches are drawn by index from the
memory-mapped `DeltaStore` with a generator seeded by (seed, step, process), so resuming from a
checkpoint continues the exact sequence of batches. The stored head holds the EMA weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .capture import Conditioning
from .collection import DeltaStore
from .config import OCDConfig
from .data_checks import RobustStatistics
from .head import OCDHead
from .sampling import make_train_scheduler, training_target
from .scale import scale_loss
from .serialization import fsync_path
from .training_args import OCDTrainingArguments

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

_CKPT = re.compile(r"^step-(\d+)$")
EMA_NAME = "ema.safetensors"
DONE_NAME = "done"


def latest_checkpoint(output_dir: str | os.PathLike | None) -> Path | None:
    """The newest complete checkpoint under `output_dir/checkpoints`, or None.

    A checkpoint counts only when its `done` marker parses and every file it lists still has the sha256
    recorded at save; others (killed during save, truncated, edited) are skipped with a warning.
    """
    for _, path in _checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if (path / DONE_NAME).exists():
            warnings.warn(f"Skipping checkpoint {path}: {problem}", RuntimeWarning, stacklevel=2)
    return None


def _checkpoints(output_dir: str | os.PathLike | None) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-N` folder, newest first."""
    if output_dir is None:
        return []
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name))), reverse=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is complete and intact."""
    try:
        done = json.loads((path / DONE_NAME).read_text(encoding="utf-8"))
        step = done["step"]
    except FileNotFoundError:
        return "no done marker (killed while saving)"
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        return f"its done marker is unreadable ({type(e).__name__}: {e})"
    files = done.get("files")
    if not isinstance(step, int) or not isinstance(files, dict):
        return "its done marker is malformed or was written by an older ocd_hf (EMA pickled; never loaded)"
    if EMA_NAME not in files:
        return f"it has no {EMA_NAME}"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} changed since it was saved (truncated or edited)"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def usable_rows(store: DeltaStore) -> torch.Tensor | None:
    """Rows with a non-zero delta, or None when that is all of them.

    A sample whose loss has zero gradient (labelled with cross_entropy's ignore_index, or a float32
    softmax saturated at 1) gets Δ = 0 and ρ = 0: Δ/ρ is undefined and the scale loss on ρ = 0 is
    ~300 dB, so such rows teach the head nothing but noise. They are left out, with a warning.
    """
    scale = store.column("scale")
    keep = (scale > 0).nonzero().flatten()
    if len(keep) == len(scale):
        return None
    if len(keep) == 0:
        raise ValueError(
            "Every collected sample has a zero delta (zero loss gradient): there is nothing to learn. The loss "
            "does not depend on the layer's weights for any sample: check that the base model's output is not "
            "constant (e.g. a ReLU closed for every input, a dead network) and that the labels are not all ignored."
        )
    dropped = (scale <= 0).nonzero().flatten()
    index = store.get_batch(dropped[:10])["index"].tolist()
    warnings.warn(
        f"{len(dropped)} of {len(scale)} collected samples have a zero delta (no loss gradient: ignore_index "
        f"labels or saturated outputs; dataset indices {index}{' …' if len(dropped) > 10 else ''}) and are left "
        "out of head training.",
        RuntimeWarning,
        stacklevel=3,
    )
    return keep


def omega_batch(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Δ/ρ: each sample's delta at unit scale (the diffusion target)."""
    scale = batch["scale"].clamp_min(1e-12)
    return batch["delta"] / scale.view(-1, *([1] * (batch["delta"].dim() - 1)))


def train_head(
    head: OCDHead,
    store: DeltaStore,
    config: OCDConfig,
    args: OCDTrainingArguments,
    *,
    accelerator: Accelerator | None = None,
) -> list[dict[str, float]]:
    """Train denoiser and scale net for `args.num_train_steps` steps; the head ends with the EMA weights.

    With `config.cond_dropout` > 0 each sample's denoiser sees the null condition with that probability
    (classifier-free guidance; the scale net always sees I(x)).

    With `args.early_stopping_patience` set, `args.eval_size` rows of the store are held out of training;
    every `args.eval_every` steps the EMA head's denoising loss on them (fixed noise and timesteps) is
    measured, and training stops once it has not improved for `early_stopping_patience` evaluations.

    Args:
        head: A freshly built head; its normalisation statistics are set from `store` first.
        store: The collected deltas and conditioning.
        config: The head's settings (diffusion schedule, prediction type, condition dropout).
        args: Steps, learning rate, batch size, EMA, clipping, seed, checkpointing (`output_dir`,
            `checkpoint_every`, `resume`) and `progress`.
        accelerator: Runs the loop (one or several processes); a default one when None.

    Returns:
        One record per step: step, denoiser_loss, scale_loss_db; with early stopping, evaluation steps also
        hold eval_denoiser_loss, and the last record holds stopped_early=True when training stopped early.
    """
    output_dir, resume, checkpoint_every, progress = args.output_dir, args.resume, args.checkpoint_every, args.progress
    # diffusers is imported where it is used: importing it pulls in torch._dynamo, which would make
    # `import ocd_hf` slow for code that only runs a trained head
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    accelerator = accelerator or Accelerator()
    torch.manual_seed(args.seed)
    head.set_statistics(RobustStatistics(store))  # outlier rows (named in a warning) are left out
    scheduler = make_train_scheduler(config)
    opt = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=0.0)
    total = args.num_train_steps
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(100, total // 10), num_training_steps=total)
    ema = EMAModel(head.parameters(), decay=args.ema_decay)
    model, opt, lr_sched = accelerator.prepare(head, opt, lr_sched)
    # The EMA is saved by _save_checkpoint as safetensors, not registered with accelerate: accelerate
    # restores registered objects with torch.load(weights_only=False), which runs any code in the file.
    ema.to(accelerator.device)

    done = _resume(accelerator, ema, output_dir) if resume else {}
    start = done.get("step", 0)
    rows = usable_rows(store)  # None: every row
    stopper = None
    if args.early_stopping_patience is not None:
        rows, held = holdout_rows(len(store) if rows is None else rows, args.eval_size, args.seed)
        stopper = EarlyStopping(
            args.early_stopping_patience, held_out_batches(store, held, config, args.seed, args.train_batch_size)
        )
        stopper.load_state(done.get("early_stopping"))
    n = len(store) if rows is None else len(rows)
    bs = min(args.train_batch_size, n)
    target_shape = head.denoiser.weight_shape
    history: list[dict[str, float]] = []
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    bar = tqdm(range(start, total), desc="training OCD head", disable=not (progress and accelerator.is_main_process))
    for step in bar:
        g = torch.Generator().manual_seed(
            args.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index
        )
        idx = torch.randint(0, n, (bs,), generator=g)
        idx = idx if rows is None else rows[idx]
        batch = {k: v.to(accelerator.device) for k, v in store.get_batch(idx).items()}
        clean = omega_batch(batch).reshape(bs, *target_shape)
        noise = torch.randn(clean.shape, generator=g).to(accelerator.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (bs,), generator=g).to(accelerator.device)
        noisy = scheduler.add_noise(clean, noise, t)
        cond = Conditioning(batch["layer_input"], batch["layer_output"], batch["model_output"])
        if config.cond_dropout > 0:
            # classifier-free guidance: drawn last from g, so the other draws match a cond_dropout=0 run
            drop = (torch.rand(bs, generator=g) < config.cond_dropout).to(accelerator.device)
            pred, scale_pred = model(noisy, t, cond, drop)
        else:
            pred, scale_pred = model(noisy, t, cond)
        loss_d = F.mse_loss(pred, training_target(scheduler, clean, noise, t))
        loss_s = scale_loss(scale_pred, batch["scale"])
        # The two nets share no parameters, so one backward of the sum trains both independently.
        accelerator.backward(loss_d + loss_s)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unwrapped.parameters())
        if not torch.isfinite(loss_d):
            raise FloatingPointError(f"Denoiser loss became {loss_d.item()} at step {step}; lower learning_rate.")
        rec = {"step": step + 1, "denoiser_loss": loss_d.item(), "scale_loss_db": loss_s.item()}
        history.append(rec)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{rec['denoiser_loss']:.4f}", scale_db=f"{rec['scale_loss_db']:.1f}")
        stop = False
        if stopper is not None and (step + 1) % args.eval_every == 0:
            rec["eval_denoiser_loss"] = stopper.evaluate(unwrapped, ema, scheduler, accelerator.device)
            stop = stopper.should_stop()
            if stop:
                rec["stopped_early"] = True
        if (
            output_dir is not None
            and checkpoint_every
            and (step + 1) % checkpoint_every == 0
            and step + 1 < total
            and not stop
        ):
            extra = {"early_stopping": stopper.state()} if stopper is not None else None
            _save_checkpoint(accelerator, Path(output_dir), step + 1, ema, args.save_total_limit, extra)
        if stop:
            break
    accelerator.wait_for_everyone()
    ema.copy_to(unwrapped.parameters())
    unwrapped.eval()
    return history


def holdout_rows(rows: int | torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows): `size` of `rows` (a count means range(rows)), at most a tenth of
    them and at least one, drawn with `seed`."""
    rows = torch.arange(rows) if isinstance(rows, int) else rows
    if len(rows) < 2:
        raise ValueError("Early stopping needs at least 2 usable collected samples (one is held out).")
    k = max(1, min(size, len(rows) // 10))
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 1_000_003 + 7))
    return rows[perm[k:]].sort().values, rows[perm[:k]].sort().values


def held_out_batches(
    store: DeltaStore, rows: torch.Tensor, config: OCDConfig, seed: int, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """The held-out rows in batches, each with its fixed noise and timesteps (drawn once, with `seed`)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 11)
    out = []
    for chunk in rows.split(batch_size):
        batch = store.get_batch(chunk)
        clean = omega_batch(batch).reshape(len(chunk), *store.target_shape)
        batch["clean"] = clean
        batch["noise"] = torch.randn(clean.shape, generator=g)
        batch["t"] = torch.randint(0, config.num_train_timesteps, (len(chunk),), generator=g)
        out.append(batch)
    return out


class EarlyStopping:
    """The held-out denoising loss of the EMA head, and whether it stopped improving.

    Args:
        patience: Evaluations without a new best loss after which training stops.
        batches: Held-out batches with fixed noise and timesteps (`held_out_batches`).
    """

    def __init__(self, patience: int, batches: list[dict[str, torch.Tensor]]):
        self.patience, self.batches = patience, batches
        self.best, self.bad = float("inf"), 0

    @torch.no_grad()
    def evaluate(self, head: OCDHead, ema: EMAModel, scheduler, device: torch.device) -> float:
        """Mean denoising loss of the EMA weights on the held-out rows; the head's weights are left as they were."""
        params = list(head.parameters())
        ema.store(params)
        ema.copy_to(params)
        head.eval()
        total, count = 0.0, 0
        try:
            for b in self.batches:
                clean, noise, t = (b[k].to(device) for k in ("clean", "noise", "t"))
                cond = Conditioning(*(b[k].to(device) for k in ("layer_input", "layer_output", "model_output")))
                pred, _ = head(scheduler.add_noise(clean, noise, t), t, cond)
                target = training_target(scheduler, clean, noise, t)
                total += F.mse_loss(pred, target, reduction="sum").item() / target[0].numel()
                count += len(t)
        finally:
            ema.restore(params)
            head.train()
        loss = total / count
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        return loss

    def should_stop(self) -> bool:
        return self.bad >= self.patience

    def state(self) -> dict[str, float]:
        return {"best": self.best, "bad": self.bad}

    def load_state(self, state: dict[str, float] | None) -> None:
        if state:
            self.best, self.bad = float(state["best"]), int(state["bad"])


def _resume(accelerator: Accelerator, ema: EMAModel, output_dir: str | None) -> dict:
    """Load the newest complete checkpoint; returns its done marker ({} when there is none).

    accelerate reads the optimizer, scheduler and RNG files with torch.load(weights_only=True), which
    refuses anything but tensors and plain containers; the EMA comes from safetensors. Files are checked
    against the hashes in `done` first, so a damaged checkpoint is skipped before anything is loaded, and
    files that `done` does not list are never read.
    """
    path = latest_checkpoint(output_dir)
    if path is None:
        return {}
    listed = json.loads((path / DONE_NAME).read_text(encoding="utf-8"))["files"]
    try:
        # accelerate reads whatever its file names match in the folder; show it only the files that were saved.
        with tempfile.TemporaryDirectory(prefix="ocd-resume-") as stage:
            for name in listed:
                os.symlink((path / name).absolute(), Path(stage, name))
            accelerator.load_state(stage, load_kwargs={"weights_only": True})
        _load_ema(ema, path / EMA_NAME, accelerator.device)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        # Part of the state may be loaded already: stop rather than train on a mix.
        raise RuntimeError(
            f"Checkpoint {path} passed its hash check but failed to load ({type(e).__name__}: {str(e)[:300]}). "
            "Its done marker was rewritten after the files changed; delete that folder to resume from an older "
            "checkpoint, or pass resume=False."
        ) from None
    return json.loads((path / DONE_NAME).read_text(encoding="utf-8"))


def _load_ema(ema: EMAModel, path: Path, device: torch.device) -> None:
    tensors = load_file(str(path), device="cpu")
    shadow = [tensors[f"shadow.{i}"] for i in range(len(ema.shadow_params))]
    if len(tensors) != len(shadow) + 1 or any(a.shape != b.shape for a, b in zip(shadow, ema.shadow_params)):
        raise ValueError(f"{path} does not match this head's parameters.")
    ema.shadow_params = [t.to(device) for t in shadow]
    ema.optimization_step = int(tensors["optimization_step"].item())


def _save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    ema: EMAModel,
    keep: int | None = None,
    extra: dict | None = None,
) -> None:
    """Save the training state at `step` into `output_dir/checkpoints/step-N`, keeping the newest `keep`;
    `extra` (plain JSON) is stored in the done marker."""
    path = output_dir / "checkpoints" / f"step-{step}"
    if accelerator.is_main_process and path.exists():
        shutil.rmtree(path)  # a folder left by a killed save of the same step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        ema_state = {f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}
        ema_state["optimization_step"] = torch.tensor(ema.optimization_step, dtype=torch.int64)
        save_file(ema_state, str(path / EMA_NAME))
        files = {f.name: _sha256(f) for f in sorted(path.iterdir()) if f.is_file() and f.name != DONE_NAME}
        for f in path.iterdir():
            fsync_path(f)
        # "done" marks a finished checkpoint: written last, atomically and synced, so after a kill it is
        # either absent or complete, and it lists the files' hashes so a truncated checkpoint is skipped.
        _atomic_write(path / DONE_NAME, json.dumps({"step": step, "files": files, **(extra or {})}))
        if keep:
            for _, old in [c for c in _checkpoints(output_dir) if c[0] < step][max(keep - 1, 0) :]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
