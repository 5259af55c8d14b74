"""Diffusers schedulers for training and sampling, and the DDIM loop that turns noise into deltas."""

from __future__ import annotations

import warnings

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from .capture import Conditioning
from .config import OCDConfig
from .denoiser import ConditionalUNet1D, null_condition
from .modes import eval_mode


def make_train_scheduler(config: OCDConfig) -> DDPMScheduler:
    # clip_sample defaults to True in diffusers; Ω is not confined to [-1, 1].
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
    )


def make_sampling_scheduler(config: OCDConfig) -> DDIMScheduler:
    # "trailing" spacing starts the 10 steps at t = T-1, i.e. from (almost) pure noise.
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
        timestep_spacing="trailing",
    )


def training_target(
    scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    return scheduler.get_velocity(clean, noise, t)


@torch.no_grad()
def sample_omega(
    denoiser: ConditionalUNet1D,
    cond: Conditioning,
    scheduler: DDIMScheduler,
    num_inference_steps: int = 10,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Run DDIM from noise; returns normalised deltas Ω_0 of shape [num_samples, B, *weight_shape].

    `cond` is the normalised I(x). All draws run as one batch. The denoiser is put in eval mode for the
    loop and its mode restored.

    Classifier-free guidance: with `guidance_scale` w != 1 every step runs the conditional and the null
    (all-zeros normalised) condition in one doubled batch and uses uncond + w·(cond − uncond) — valid for
    every prediction_type, each being linear in the model output. w == 1 is the plain single pass.
    """
    b = cond.layer_input.shape[0]
    device = cond.layer_input.device
    rep = Conditioning(*(c.repeat(num_samples, 1) for c in cond))
    shape = (num_samples * b, *denoiser.weight_shape)
    # noise is drawn in float32 whatever the head's dtype, so a cast head samples from the same stream
    dtype = next(denoiser.parameters(), torch.empty(0)).dtype
    x = torch.randn(shape, generator=generator, device=device if generator is None else generator.device)
    x = x.to(device=device, dtype=dtype)
    scheduler.set_timesteps(num_inference_steps, device=device)
    guided = guidance_scale != 1.0
    if guided:
        if getattr(denoiser, "cond_dropout", None) == 0:
            warnings.warn(
                f"guidance_scale={guidance_scale} on a head trained with cond_dropout=0: its null-condition "
                "branch was never trained, so guidance extrapolates from an untrained prediction. Train with "
                "cond_dropout > 0 (e.g. 0.1) to use classifier-free guidance.",
                stacklevel=2,
            )
        both = Conditioning(*(torch.cat([c, n]) for c, n in zip(rep, null_condition(rep))))
    with eval_mode(denoiser):
        for t in scheduler.timesteps:
            if guided:
                pred_cond, pred_uncond = denoiser(torch.cat([x, x]), t, both).chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            else:
                pred = denoiser(x, t, rep)
            x = scheduler.step(pred, t, x, eta=0.0).prev_sample
    return x.reshape(num_samples, b, *denoiser.weight_shape)
