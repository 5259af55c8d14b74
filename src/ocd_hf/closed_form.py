"""Closed-form per-sample overfitting of a Linear layer that sees one input vector per sample.

When layer L gets one input vector a per sample ([B, in], one call per forward), the gradient of the
loss at W + Δ is δ aᵀ, δ = ∂loss/∂y the gradient at L's output: rank one, and a never changes between
steps (the layers before L are frozen). So every optimizer step is a formula in two vectors:

- SGD: Δ_k = -lr (δ_1 + … + δ_k) aᵀ, exactly rank one.
- Adam: the moments are M_k aᵀ and V_k (a²)ᵀ with M_k, V_k Adam's moments of δ alone ([B, out]), and
  step k adds -lr/bc1 · M_k[o] a[i] / (√(V_k[o]/bc2) |a[i]| + eps) to Δ[o, i]. Because of eps this is
  not rank one, so it is evaluated elementwise, but from the vectors: no per-sample Adam state over
  [B, out, in] is kept and no weight-sized gradient is formed.

Only δ_k is backpropagated: L's output is cut from the graph and made a leaf, so a backward runs
through the layers after L only. The next forward adds Δ_k a (a [B, out] vector) to L's output.
The values are torch.optim.Adam's / SGD's up to float rounding (the same formula, evaluated in a
different order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .buffers import current_pool
from .capture import Conditioning
from .conditioner import Conditioner, first_pass, resolve_conditioner
from .losses import check_per_sample
from .modes import eval_mode
from .per_sample import out_features
from .prefix import reuse_prefix

# torch.optim.Adam's defaults, named because the closed forms repeat Adam's update rule
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# bytes of delta rows handled at a time by a closed-form step: a cache-sized share of the batch
SUB_CHUNK_BYTES = 2**19


@dataclass
class ClosedFormRun:
    """Δ laid out [B, out, in] (whatever the layer's own weight layout), Δ bias, and I(x) of the first pass."""

    delta: torch.Tensor
    delta_bias: torch.Tensor | None
    scale: torch.Tensor  # the unbiased std of each sample's delta
    conditioning: Conditioning
    loss_before: torch.Tensor


def closed_form_full(
    model: nn.Module,
    layer: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    forward_fn: Callable[[nn.Module, Any], Any],
    steps: int,
    lr: float,
    optimizer: str,
    include_bias: bool,
    reuse: bool = True,
    conditioner: Conditioner | None = None,
) -> ClosedFormRun:
    """Overfit a Linear / transformers Conv1D `layer` on every sample by the closed form (module docstring).

    Args:
        model: The model; in eval mode meanwhile.
        layer: The target layer; it must see one input vector per sample, in one call per forward.
        inputs: The batch's inputs, as `forward_fn` takes them.
        targets: Labels with the batch first.
        loss_fn: Per-sample loss, [B].
        forward_fn: forward_fn(model, inputs) -> outputs.
        steps: Optimizer steps per sample.
        lr: Their learning rate.
        optimizer: "adam" or "sgd".
        include_bias: Also overfit the layer's bias.
        reuse: Reuse the layers before `layer` between passes (`ocd_hf.prefix`).
        conditioner: Makes I(x) from the first (unmodified) pass; `MeanPool` when None.
    """
    conditioner = resolve_conditioner(conditioner)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"Unknown overfit optimizer {optimizer!r}; use 'adam' or 'sgd'.")
    if steps < 1:
        raise ValueError(f"steps={steps}: overfitting needs at least one step.")
    batch = targets.shape[0]
    dtype, device = layer.weight.dtype, layer.weight.device
    with_bias = include_bias and getattr(layer, "bias", None) is not None
    seen: dict[str, torch.Tensor | None] = {"shift": None}

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.dim() != 2 or x.shape[0] != batch:
            raise ValueError(
                f"The closed form needs one input vector per sample ([{batch}, in]); the layer got {tuple(x.shape)}."
            )
        seen.setdefault("x", x.detach())
        y = output.detach()
        if seen["shift"] is not None:
            y = y + seen["shift"].to(y.dtype)
        seen["y"] = y.requires_grad_(True)  # a leaf: the backward stops here
        return seen["y"]

    buffers = current_pool()
    with eval_mode(model), reuse_prefix(model, layer, reuse, ops=True) as prefix:

        def forward() -> Any:
            with prefix.replaying():
                return forward_fn(model, inputs)

        handle = layer.register_forward_hook(hook)
        try:
            for k in range(1, steps + 1):
                if k == 1:
                    out, cond, _ = first_pass(conditioner, layer, forward)
                else:
                    out = forward()
                losses = check_per_sample(loss_fn(out, targets), batch)
                (d,) = torch.autograd.grad(losses.sum(), seen["y"], allow_unused=True)
                d = torch.zeros(batch, out_features(layer), dtype=dtype, device=device) if d is None else d.to(dtype)
                if k == 1:
                    loss_before = losses.detach()
                    x = seen["x"].to(dtype)
                    shape = (batch, d.shape[1], x.shape[1])
                    delta = (
                        torch.empty(shape, dtype=dtype, device=device)
                        if buffers is None
                        else buffers.get("delta", shape, dtype, device)
                    )
                    moments = torch.zeros_like(d), torch.zeros_like(d)
                    bias_delta = torch.zeros_like(d) if with_bias else None
                if optimizer == "sgd":
                    moments[0].add_(d, alpha=-lr)  # -lr Σ δ_j: Δ_k = that ⊗ a
                    if bias_delta is not None:
                        bias_delta.add_(d, alpha=-lr)
                    if k < steps:
                        seen["shift"] = moments[0] * x.pow(2).sum(1, keepdim=True)
                else:
                    shift, scale = _adam_step(delta, moments, bias_delta, d, x, k, steps, lr, buffers)
                    if k < steps:
                        seen["shift"] = shift
                if k < steps and bias_delta is not None:
                    seen["shift"] = seen["shift"] + bias_delta
        finally:
            handle.remove()
    if optimizer == "sgd":
        torch.mul(moments[0].unsqueeze(2), x.unsqueeze(1), out=delta)
        scale = row_std(delta.flatten(1))
    return ClosedFormRun(delta, bias_delta, scale, cond, loss_before)


@torch.no_grad()
def _adam_step(
    delta: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor],
    bias_delta: torch.Tensor | None,
    d: torch.Tensor,
    x: torch.Tensor,
    k: int,
    steps: int,
    lr: float,
    buffers: Any,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Adam step k on Δ = Σ_j -lr/bc1_j M_j aᵀ / (√(V_j/bc2_j) |a|ᵀ + eps), written into `delta` (k = 1 fills it).

    Returns Δ a for the next forward (k < steps) or each sample's std of Δ (k = steps).
    """
    b1, b2 = ADAM_BETAS
    m, v = moments
    m.lerp_(d, 1 - b1)  # torch.optim.Adam's update of exp_avg, on the [B, out] factor
    v.mul_(b2).addcmul_(d, d, value=1 - b2)
    bc1, bc2 = 1 - b1**k, 1 - b2**k
    a = m * (-lr / bc1)
    s = v.sqrt() / math.sqrt(bc2)
    if bias_delta is not None:  # the bias gradient is δ itself: the same moments, and eps on s directly
        bias_delta.add_(a / (s + ADAM_EPS))
    # a x / (s|x| + eps) = x / (r|x| + e) with r = s/a, e = eps/a: the denominator is the product of
    # [r, e] ([B, out, 2]) and [|x|; 1] ([B, 2, in]), one bmm; one addcdiv applies it.
    # a = 0 (no gradient yet) gives r = 0, e = inf: a zero step.
    zero = a == 0
    big = torch.finfo(a.dtype).max
    r = torch.where(zero, torch.zeros_like(a), s / a).nan_to_num_(nan=0.0, posinf=big, neginf=-big)
    e = torch.where(zero, torch.full_like(a, math.inf), ADAM_EPS / a)
    left, right = torch.stack([r, e], 2), torch.stack([x.abs(), torch.ones_like(x)], 1)
    batch, per = delta.shape[0], delta[0].numel()
    # a few samples at a time, so the denominator and the delta rows stay in cache from one op to the
    # next (the step is bound by memory traffic, not arithmetic)
    sub = max(1, SUB_CHUNK_BYTES // max(per * delta.element_size(), 1))
    shape = (min(sub, batch), *delta.shape[1:])
    den = (
        torch.empty(shape, dtype=delta.dtype, device=delta.device)
        if buffers is None
        else buffers.get("den", shape, delta.dtype, delta.device)
    )
    last = k == steps
    out = torch.empty(batch, dtype=delta.dtype, device=delta.device) if last else torch.empty_like(d)
    for s0 in range(0, batch, sub):
        s1 = min(s0 + sub, batch)
        part, dn, xs = delta[s0:s1], den[: s1 - s0], x[s0:s1]
        torch.bmm(left[s0:s1], right[s0:s1], out=dn)
        if k == 1:
            torch.div(xs.unsqueeze(1), dn, out=part)
        else:
            part.addcdiv_(xs.unsqueeze(1), dn)
        if last:
            out[s0:s1] = row_std(part.flatten(1), dn.view(s1 - s0, -1))
        else:
            torch.bmm(part, xs.unsqueeze(2), out=out[s0:s1].unsqueeze(2))
    return (None, out) if last else (out, None)


def row_std(x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased std of every row: the centred rows' norm (two plain passes run faster on CPU than torch.std).

    Args:
        x: [N, D] rows.
        work: Optional [N, D] buffer for the centred rows.
    """
    centred = torch.sub(x, x.mean(dim=1, keepdim=True), out=work)
    return torch.linalg.vector_norm(centred, dim=1).div_(math.sqrt(max(x.shape[1] - 1, 1)))
