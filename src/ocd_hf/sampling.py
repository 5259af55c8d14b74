"""Diffusers schedulers for training and sampling, and the DDIM loop that turns noise into deltas."""

from __future__ import annotations

import copy
import functools
import warnings
from typing import TYPE_CHECKING

import torch

from .capture import Conditioning
from .config import OCDConfig
from .denoiser import ConditionalUNet1D, null_condition
from .modes import eval_mode

if TYPE_CHECKING:  # diffusers is imported where it is used: it pulls in torch._dynamo
    from diffusers import DDIMScheduler, DDPMScheduler


def make_train_scheduler(config: OCDConfig) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    # clip_sample defaults to True in diffusers; Ω is not confined to [-1, 1].
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        clip_sample=False,
    )


def make_sampling_scheduler(config: OCDConfig) -> DDIMScheduler:
    """The DDIM scheduler of `config`: a shallow copy of one built once per setting (building one runs
    diffusers' config machinery, a noticeable share of a batch-1 call); `set_timesteps` on the copy
    rebinds its own timesteps and leaves the shared schedule tensors alone."""
    return copy.copy(_sampling_scheduler(config.num_train_timesteps, config.beta_schedule, config.prediction_type))


@functools.lru_cache(maxsize=16)
def _sampling_scheduler(num_train_timesteps: int, beta_schedule: str, prediction_type: str) -> DDIMScheduler:
    from diffusers import DDIMScheduler

    # "trailing" spacing starts the 10 steps at t = T-1, i.e. from (almost) pure noise.
    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
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


def sample_omega(
    denoiser: ConditionalUNet1D,
    cond: Conditioning,
    scheduler: DDIMScheduler,
    num_inference_steps: int = 10,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run DDIM from noise; returns normalised deltas Ω_0 of shape [num_samples, B, *weight_shape].

    `cond` is the normalised I(x). All draws run as one batch, and the condition's embedding is computed
    once per call (not once per step). The denoiser is put in eval mode for the loop and its mode
    restored. The loop runs under `torch.no_grad` (not `inference_mode`, whose result would need a copy
    before callers could use it in autograd). The last step of an x0-predicting denoiser lands on
    alpha_cumprod = 1, where DDIM's update returns the prediction itself: it is returned without the
    scheduler's arithmetic (`returns_prediction`).

    Classifier-free guidance: with `guidance_scale` w != 1 every step runs the conditional and the null
    (all-zeros normalised) condition in one doubled batch and uses uncond + w·(cond − uncond) — valid for
    every prediction_type, each being linear in the model output. w == 1 is the plain single pass.

    Args:
        noise: The starting noise [num_samples·B, *weight_shape] (draw-major); drawn from `generator` when None.
    """
    b = cond.layer_input.shape[0]
    device = cond.layer_input.device
    shape = (num_samples * b, *denoiser.weight_shape)
    # noise is drawn in float32 whatever the head's dtype, so a cast head samples from the same stream
    dtype = next(denoiser.parameters(), torch.empty(0)).dtype
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device if generator is None else generator.device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape} (num_samples·B, *weight_shape).")
    guided = guidance_scale != 1.0
    if guided and getattr(denoiser, "cond_dropout", None) == 0:
        warnings.warn(
            f"guidance_scale={guidance_scale} on a head trained with cond_dropout=0: its null-condition "
            "branch was never trained, so guidance extrapolates from an untrained prediction. Train with "
            "cond_dropout > 0 (e.g. 0.1) to use classifier-free guidance.",
            stacklevel=2,
        )
    scheduler.set_timesteps(num_inference_steps, device=device)
    last = scheduler.timesteps[-1] if returns_prediction(scheduler) else None
    with torch.no_grad(), eval_mode(denoiser), denoiser.condition_cache():
        x = noise.to(device=device, dtype=dtype)
        rep = Conditioning(*(c.repeat(num_samples, 1) for c in cond))
        if guided:
            rep = Conditioning(*(torch.cat([c, n]) for c, n in zip(rep, null_condition(rep))))
        for t in scheduler.timesteps:
            if guided:
                pred_cond, pred_uncond = denoiser(torch.cat([x, x]), t, rep).chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            else:
                pred = denoiser(x, t, rep)
            x = pred if last is not None and t == last else scheduler.step(pred, t, x, eta=0.0).prev_sample
    return x.reshape(num_samples, b, *denoiser.weight_shape)


def returns_prediction(scheduler: DDIMScheduler) -> bool:
    """Whether the DDIM update of the last of the scheduler's timesteps is the denoiser's prediction itself.

    It is when the denoiser predicts x0 and that step lands on the final alpha_cumprod of 1: then
    prev = 1·x0 + 0·ε, the same numbers up to the sign of zeros.
    """
    prev = int(scheduler.timesteps[-1]) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return scheduler.config.prediction_type == "sample" and prev < 0 and float(scheduler.final_alpha_cumprod) == 1.0
