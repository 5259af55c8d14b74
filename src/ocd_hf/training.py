"""Training of the OCD head on collected deltas, on accelerate.

The same code runs under `python` and `accelerate launch`: batches are drawn by index from the
memory-mapped `DeltaStore` with a generator seeded by (seed, step, process), so resuming from a
checkpoint continues the exact sequence of batches. The stored head holds the EMA weights.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .capture import Conditioning
from .collection import DeltaStore
from .config import OCDConfig
from .head import OCDHead
from .sampling import make_train_scheduler, training_target
from .scale import scale_loss
from .training_args import OCDTrainingArguments

_CKPT = re.compile(r"^step-(\d+)$")


def latest_checkpoint(output_dir: str | os.PathLike | None) -> Path | None:
    if output_dir is None:
        return None
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / "done").exists()]
    return max(found)[1] if found else None


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

    Args:
        head: A freshly built head; its normalisation statistics are set from `store` first.
        store: The collected deltas and conditioning.
        config: The head's settings (diffusion schedule, prediction type, condition dropout).
        args: Steps, learning rate, batch size, EMA, clipping, seed, checkpointing (`output_dir`,
            `checkpoint_every`, `resume`) and `progress`.
        accelerator: Runs the loop (one or several processes); a default one when None.

    Returns:
        One record per step: step, denoiser_loss, scale_loss_db.
    """
    output_dir, resume, checkpoint_every, progress = args.output_dir, args.resume, args.checkpoint_every, args.progress
    accelerator = accelerator or Accelerator()
    torch.manual_seed(args.seed)
    head.set_statistics(store)
    scheduler = make_train_scheduler(config)
    opt = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=0.0)
    total = args.num_train_steps
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=min(100, total // 10), num_training_steps=total)
    ema = EMAModel(head.parameters(), decay=args.ema_decay)
    model, opt, lr_sched = accelerator.prepare(head, opt, lr_sched)
    accelerator.register_for_checkpointing(ema)
    ema.to(accelerator.device)

    start = 0
    ckpt = latest_checkpoint(output_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        start = json.loads((ckpt / "done").read_text())["step"]
    n = len(store)
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
        if output_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < total:
            _save_checkpoint(accelerator, Path(output_dir), step + 1)
    accelerator.wait_for_everyone()
    ema.copy_to(unwrapped.parameters())
    unwrapped.eval()
    return history


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int) -> None:
    path = output_dir / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        # "done" marks a finished checkpoint; a kill during save_state leaves a folder that resume ignores.
        (path / "done").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
