"""Distillation: a one-pass student that maps (noise z, I(x)) straight to the head's DDIM sample.

The teacher is the head's denoiser sampled with `num_inference_steps` DDIM steps at the config's
`guidance_scale`. The student is a denoiser of the same kind (a diffusers `UNet1DModel` and conditioning
encoders) that is sampled as a 1-step DDIM from t = T-1. By default (`student_channels="teacher"`) it is a
copy of the teacher, weights included: for the default x0-prediction its one pass is then the teacher's
own first step, so training starts from the 1-step sampler. A narrower student (`"half"`, or explicit
widths) costs less per pass but starts from random weights (docs/concepts.md has both measured). It is
trained to regress the teacher's sample for the same noise and conditioning ("direct" distillation):
a bank of `num_draws` noises per conditioning vector is sampled once with the teacher, then the student
fits it with an MSE in Ω = Δ/ρ space. The scale net is untouched. Draws stay stochastic: the student's
input is fresh noise, the same noise the teacher would start from for the same generator.

Why this method and not progressive or consistency distillation: docs/concepts.md, "Sampling and distillation".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .capture import Conditioning
from .collection import DeltaStore
from .sampling import make_sampling_scheduler, sample_omega

_COND_KEYS = ("layer_input", "layer_output", "model_output")


def conditioning_of(ocd: Any, data: Any, batch_size: int = 256) -> Conditioning:
    """Raw I(x) of `data` on the head's device.

    Args:
        ocd: A fitted `OCDWrapper`.
        data: A `DeltaStore` (its stored I(x) are used, no model pass), a `Conditioning`, or a labelled
            dataset of the kind `fit` takes (the model runs once per batch; labels are ignored).
        batch_size: Batch size of the model passes.
    """
    device = ocd.device
    if isinstance(data, DeltaStore):
        return Conditioning(*(data.column(k).float().to(device) for k in _COND_KEYS))
    if isinstance(data, Conditioning):
        return Conditioning(*(c.float().to(device) for c in data))
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(f"distill needs a DeltaStore, a Conditioning or a labelled dataset; got {type(data).__name__}.")
    adapter = ocd.adapter
    parts = []
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn()):
        inputs, _ = adapter.split_batch(adapter.to_device(batch, device))
        parts.append(ocd.conditioning(inputs)[0])
    return Conditioning(*(torch.cat(c).float() for c in zip(*parts)))


def teacher_bank(
    head: Any,
    config: Any,
    cond: Conditioning,
    num_draws: int,
    generator: torch.Generator,
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index of the conditioning row, noise z, teacher's Ω_0 from z) for `num_draws` noises per row of `cond`."""
    normed = head.normalize(cond)
    n = normed.layer_input.shape[0]
    shape = head.denoiser.weight_shape
    scheduler = make_sampling_scheduler(config)
    rows, noises, targets = [], [], []
    step = max(1, batch_size // num_draws)
    for lo in tqdm(range(0, n, step), desc="sampling the teacher", disable=not progress):
        hi = min(n, lo + step)
        part = Conditioning(*(c[lo:hi] for c in normed))
        z = torch.randn((num_draws * (hi - lo), *shape), generator=generator).to(normed.layer_input.device)
        omega = sample_omega(
            head.denoiser,
            part,
            scheduler,
            config.num_inference_steps,
            num_draws,
            noise=z,
            guidance_scale=config.guidance_scale,
        )
        rows.append(torch.arange(lo, hi, device=z.device).repeat(num_draws))
        noises.append(z)
        targets.append(omega.reshape(z.shape))
    return torch.cat(rows), torch.cat(noises), torch.cat(targets)


def one_pass(student: torch.nn.Module, scheduler: Any, z: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The student's Ω_0 from noise z: one denoiser pass at t = T-1, read as a 1-step DDIM (differentiable)."""
    t = scheduler.timesteps[0]
    return scheduler.step(student(z, t, cond), t, z, eta=0.0).prev_sample


def student_width(channels: tuple[int, ...], norm_num_groups: int) -> tuple[int, ...]:
    """The "half" student's `block_out_channels`: half the teacher's, rounded up to a multiple of the
    GroupNorm groups."""
    return tuple(max(1, -(-c // 2 // norm_num_groups)) * norm_num_groups for c in channels)


def distill(
    ocd: Any,
    dataset: Any,
    *,
    student_channels: tuple[int, ...] | str = "teacher",
    num_steps: int = 300,
    learning_rate: float = 3e-4,
    batch_size: int = 64,
    num_draws: int = 4,
    max_inputs: int | None = 2048,
    holdout: float = 0.1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Distil the head of `ocd` into a one-pass student and switch `ocd` to it (`config.sampler="distilled"`).

    Args:
        ocd: A fitted `OCDWrapper`; its head gains a `student` and `ocd.state.distillation` records the run.
        dataset: Where the conditioning comes from: the collection the head was trained on (a `DeltaStore`),
            the training dataset, or any unlabelled-in-effect dataset of the same kind.
        student_channels: The student U-Net's size: "teacher" (a copy of the teacher, weights included),
            "half" (half the teacher's widths, `student_width`) or explicit `block_out_channels` (multiples
            of `norm_num_groups`). A student of another size starts from random weights drawn with `seed`.
        num_steps: Optimizer steps of the student.
        learning_rate: AdamW learning rate (cosine schedule with warm-up).
        batch_size: Teacher samples per step.
        num_draws: Noises (teacher samples) per conditioning vector.
        max_inputs: Use at most this many conditioning vectors (a seeded random subset); None uses all.
        holdout: Share of the conditioning vectors kept out of training to measure the student's error.
        seed: Seeds the subset, the noises and the batch order.
        progress: Show progress bars.

    Returns:
        The distillation record (also in `ocd.state.distillation`): method, the student's channels (None
        for a copy of the teacher), teacher steps, guidance scale, sizes, and the held-out MSE to the teacher's samples before (the teacher's 1-step sampler) and after.
    """
    head = ocd.require_head()
    config = ocd.config.replace(sampler="ddim")  # the teacher is always the diffusion model
    channels = resolve_student_channels(student_channels, head.config)
    if dataset is None:
        raise ValueError(
            "distill needs conditioning to learn on: pass the DeltaStore the head was trained on "
            "(ocd.collect(...) returns it) or the training dataset: ocd.distill(train_dataset)."
        )
    g = torch.Generator().manual_seed(seed)
    cond = conditioning_of(ocd, dataset)
    n = cond.layer_input.shape[0]
    order = torch.randperm(n, generator=g)[: max_inputs or n].to(cond.layer_input.device)
    cond = Conditioning(*(c[order] for c in cond))
    n = cond.layer_input.shape[0]
    n_val = min(n - 1, int(round(n * holdout))) if n > 1 else 0
    rows, z, target = teacher_bank(head, config, cond, num_draws, g, progress=progress)
    val = rows < n_val
    normed = head.normalize(cond)

    with torch.random.fork_rng(devices=[]):  # a new student's initial weights come from `seed`
        torch.manual_seed(seed)
        student = head.add_student(config.guidance_scale, channels)
    scheduler = make_sampling_scheduler(config)
    scheduler.set_timesteps(1, device=z.device)

    def error(net: torch.nn.Module) -> float:
        with torch.no_grad():
            idx = val.nonzero().squeeze(1)
            errs = [
                F.mse_loss(
                    one_pass(net, scheduler, z[i], Conditioning(*(c[rows[i]] for c in normed))),
                    target[i],
                    reduction="sum",
                ).item()
                for i in idx.split(256)
            ]
            return sum(errs) / max(1, idx.numel() * math.prod(z.shape[1:]))

    before = error(student) if n_val else None
    train_idx = (~val).nonzero().squeeze(1)
    from diffusers.optimization import get_cosine_schedule_with_warmup  # lazily: see training.train_head

    opt = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(50, num_steps // 10), num_steps)
    student.train()
    bar = tqdm(range(num_steps), desc="distilling the sampler", disable=not progress)
    for _ in bar:
        i = train_idx[torch.randint(0, train_idx.numel(), (min(batch_size, train_idx.numel()),), generator=g)]
        loss = F.mse_loss(one_pass(student, scheduler, z[i], Conditioning(*(c[rows[i]] for c in normed))), target[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"The distillation loss became {loss.item()}; lower learning_rate.")
        bar.set_postfix(loss=f"{loss.item():.4f}")
    student.eval()
    record = {
        "method": "direct",
        "student_channels": None if channels is None else list(channels),
        "teacher_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "num_steps": num_steps,
        "num_inputs": n,
        "num_draws": num_draws,
        "heldout_mse_before": before,
        "heldout_mse_after": error(student) if n_val else None,
    }
    ocd.config = ocd.config.replace(sampler="distilled")
    ocd.state.distillation = record
    return record


def resolve_student_channels(choice: tuple[int, ...] | list[int] | str, config: Any) -> tuple[int, ...] | None:
    """`distill`'s `student_channels` as widths for `OCDHead.add_student` (None: copy the teacher)."""
    if choice == "teacher":
        return None
    if choice == "half":
        return student_width(tuple(config.block_out_channels), config.norm_num_groups)
    channels = tuple(choice) if isinstance(choice, (tuple, list)) else None
    g = config.norm_num_groups
    if not channels or not all(isinstance(c, int) and c >= 1 and c % g == 0 for c in channels):
        raise ValueError(
            f"student_channels={choice!r}: give 'teacher', 'half' or a list of U-Net widths, each a multiple of "
            f"norm_num_groups={g} (the teacher has {list(config.block_out_channels)})."
        )
    return channels
