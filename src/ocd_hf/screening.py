"""Screening for `layer="auto"`: Eq. 6 linearised, for every candidate layer from one backward pass.

Perturbing a layer's weight by ε ~ N(0, s²) (s = σ · std(W)) moves sample n's loss by ℓ_n(W + ε) − ℓ_n(W)
≈ ⟨∇_W ℓ_n, ε⟩ to first order, a Gaussian with std s · ‖∇_W ℓ_n‖. The entropy of that Gaussian is
log(s · ‖∇_W ℓ_n‖) + ½ log(2πe), so the linearised Eq. 6 score of a layer is

    Σ_n [ log(s · ‖∇_W ℓ_n‖) + ½ log(2πe) ],

which needs only the per-sample gradient norms. They come from one forward and backward of the batch
for all layers at once: a layer's per-sample gradient is Σ_t g_t x_tᵀ over its positions t (tokens,
pixels), so ‖∇_W ℓ_n‖² = Σ_{t,t'} (g_t·g_t')(x_t·x_t'), computed from the two Gram matrices (or from the
gradient itself when that is smaller). Convolutions are unfolded into positions first.
`ocd_hf.selection.select_layer` scores the best-screened layers with the full criterion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import is_hf_conv1d

HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
_F32_EPS = float(torch.finfo(torch.float32).eps)


def _positions(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor, batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs [B, T, fan_in], output grads [B, T, fan_out]) of each weight group of one call of `module`."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return [(x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1]))]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if isinstance(module, nn.Conv1d):  # as a Conv2d of height 1
            x, g = x.unsqueeze(-2), g.unsqueeze(-2)
            kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
            padding: Any = (0, module.padding[0]) if not isinstance(module.padding, str) else module.padding
        else:
            kernel, dilation, stride, padding = module.kernel_size, module.dilation, module.stride, module.padding
        if isinstance(padding, str):  # "same" / "valid": pad as the conv does, then unfold without padding
            pads = module._reversed_padding_repeated_twice
            x = F.pad(x, pads if isinstance(module, nn.Conv2d) else (*pads, 0, 0))
            padding = 0
        groups = module.groups
        cin, cout = x.shape[1] // groups, g.shape[1] // groups
        out = []
        for k in range(groups):
            cols = F.unfold(x[:, k * cin : (k + 1) * cin], kernel, dilation=dilation, padding=padding, stride=stride)
            out.append((cols.transpose(1, 2), g[:, k * cout : (k + 1) * cout].flatten(2).transpose(1, 2)))
        return out
    raise TypeError(f"No per-sample gradient rule for a {type(module).__name__}.")


def _squared_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖Σ_t g_t x_tᵀ‖² per sample for x [B, T, i], g [B, T, o], whichever way is cheaper."""
    x, g = x.double(), g.double()
    t, i, o = x.shape[1], x.shape[2], g.shape[2]
    if t * t * (i + o) <= t * i * o:
        return (x @ x.transpose(1, 2)).mul_(g @ g.transpose(1, 2)).sum((1, 2))
    return torch.einsum("bto,bti->boi", g, x).square().sum((1, 2))


@torch.no_grad()
def _layer_norms(module: nn.Module, calls: list[dict[str, torch.Tensor]], batch: int) -> torch.Tensor | None:
    """Per-sample ‖∇_W ℓ_n‖ [B] from the layer's recorded calls (several calls add their positions)."""
    calls = [c for c in calls if "g" in c]
    if not calls or any(c["x"].shape[0] != batch or c["g"].shape[0] != batch for c in calls):
        return None
    per_call = [_positions(module, c["x"], c["g"], batch) for c in calls]
    total = torch.zeros(batch, dtype=torch.float64, device=calls[0]["x"].device)
    for k in range(len(per_call[0])):  # the groups of a grouped conv are independent blocks of W
        x = torch.cat([groups[k][0] for groups in per_call], dim=1)
        g = torch.cat([groups[k][1] for groups in per_call], dim=1)
        total += _squared_norm(x, g)
    return total.clamp_min_(0).sqrt_().cpu()


@dataclass
class Screening:
    """What one forward and backward of the selection batch tells about every candidate layer.

    Attributes:
        grad_norms: name -> per-sample ‖∇_W ℓ_n‖ [B] (None when a layer's calls could not be attributed
            to the samples, e.g. it ran on another batch size).
        losses: The per-sample losses [B].
        grads: name -> the gradient of Σ_n ℓ_n for the weight (None without a gradient path).
    """

    grad_norms: dict[str, torch.Tensor | None]
    losses: torch.Tensor
    grads: dict[str, torch.Tensor | None]


def per_sample_grad_norms(
    forward_losses: Callable[[], torch.Tensor], layers: dict[str, nn.Module], batch: int, per_sample: bool = True
) -> Screening:
    """‖∇_W ℓ_n‖ of every layer's weight for each of the `batch` samples, from one forward and backward.

    Args:
        forward_losses: Returns the per-sample losses [B] of the batch (it is run with grad enabled).
        layers: The layers, by name.
        batch: B, the number of samples.
        per_sample: False: only the summed gradients (`grad_norms` are then all None).
    """
    records: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in layers}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if not args or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            entry = {"x": args[0].detach()}
            records[name].append(entry)
            out.register_hook(lambda grad: entry.__setitem__("g", grad.detach()))

        return hook

    weights = [m.weight for m in layers.values()]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        if per_sample:
            handles = [m.register_forward_hook(hook_for(name)) for name, m in layers.items()]
        with torch.enable_grad():
            losses = forward_losses()
            if losses.requires_grad and weights:
                grads = list(torch.autograd.grad(losses.sum(), weights, allow_unused=True))
            else:
                grads = [None] * len(weights)
    finally:
        for h in handles:
            h.remove()
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    return Screening(
        grad_norms={name: _layer_norms(layers[name], records[name], batch) for name in layers},
        losses=losses.detach(),
        grads=dict(zip(layers, grads)),
    )


def linearised_entropy(grad_norms: torch.Tensor, perturbation_std: float, losses: torch.Tensor) -> float:
    """Σ_n of the entropy (nats) of N(0, (s·‖∇ℓ_n‖)²): Eq. 6 for a loss linear in the weight.

    A sample whose gradient vanishes gets the std of a float32 rounding step of its loss instead (a finite,
    very low entropy, as `ocd_hf.selection.kde_entropy` gives constant losses).
    """
    floor = _F32_EPS * losses.detach().double().abs().cpu().clamp_min(1.0)
    std = torch.maximum(grad_norms.double() * perturbation_std, floor)
    return float((std.log() + HALF_LOG_2PI_E).sum())
