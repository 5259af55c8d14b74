"""Per-sample overfitting (Alg. 1), vectorized over the batch.

Δ is one [B, *W.shape] leaf tensor applied through `per_sample_weights`; the loss is the *sum* of the
per-sample losses, so Δ_b receives only sample b's gradient. Adam and SGD are elementwise, so one
optimizer over Δ is exactly B independent per-sample optimizers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .buffers import BufferPool, current_pool
from .capture import Conditioning, pool
from .closed_form import ADAM_BETAS, closed_form_full, row_std
from .conditioner import Conditioner, first_pass, resolve_conditioner
from .layers import is_hf_conv1d
from .losses import LossFn, check_per_sample
from .memory import LayerProbe, overfit_method
from .modes import eval_mode
from .per_sample import out_features, per_sample_weights
from .prefix import reuse_prefix

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]


def default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(inputs)


@dataclass
class OverfitResult:
    """Deltas and conditioning of one batch. `scale` is ρ_s = std(Δ_s), the scale net's target.

    `layer_input`, `layer_output` and `model_output` are I(x) as the conditioner made it.
    """

    delta: torch.Tensor
    delta_bias: torch.Tensor | None
    scale: torch.Tensor
    layer_input: torch.Tensor
    layer_output: torch.Tensor
    model_output: torch.Tensor
    loss_before: torch.Tensor
    # target="factored": fraction of ‖Δ‖² that u v̂ᵀ keeps (1 where exact, NaN where not measured)
    energy: torch.Tensor | None = None


@dataclass(frozen=True)
class OverfitSettings:
    """How every sample is overfitted (Alg. 1): the `overfit_*` and `target` fields of `OCDConfig`.

    Args:
        steps: Optimizer steps per sample.
        lr: Their learning rate.
        optimizer: "adam" or "sgd".
        include_bias: Also overfit the layer's bias.
        target: "full" (the whole weight delta) or "factored" (u with Δ ≈ u v̂ᵀ).
    """

    steps: int = 3
    lr: float = 5e-4
    optimizer: str = "adam"
    include_bias: bool = False
    target: str = "full"

    @classmethod
    def from_config(cls, config: Any) -> OverfitSettings:
        """The settings an `OCDConfig` asks for."""
        return cls(
            config.overfit_steps, config.overfit_lr, config.overfit_optimizer, config.overfit_bias, config.target
        )


def make_optimizer(params: list[torch.Tensor], name: str, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    if name == "adam":
        # the fused kernel makes one pass over memory per step instead of several, with the same update
        # rule; collection speed is measured in docs/results.md
        if fused:
            try:
                return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, fused=True)
            except RuntimeError:  # a device / dtype without the fused kernel
                pass
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"Unknown overfit optimizer {name!r}; use 'adam' or 'sgd'.")


def probe_layer(model: nn.Module, layer: nn.Module, inputs: Any, forward_fn: ForwardFn = default_forward) -> LayerProbe:
    """Run the first sample of `inputs` without gradients and record what the target layer sees.

    Used to choose the overfitting method and to size collection chunks before any delta is allocated.
    """
    seen: list[tuple[tuple[int, ...], int]] = []

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
        seen.append((tuple(args[0].shape[1:]), output[0].numel()))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad(), eval_mode(model):
            out = forward_fn(model, take(inputs, 0))
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("The target layer did not run in the model's forward; check the layer name.")
    return LayerProbe(
        input_shape=seen[0][0], output_numel=seen[0][1], model_output_numel=pool(out)[0].numel(), calls=len(seen)
    )


def overfit_batch(
    model: nn.Module,
    layer: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    forward_fn: ForwardFn = default_forward,
    steps: int = 3,
    lr: float = 5e-4,
    optimizer: str = "adam",
    include_bias: bool = False,
    target: str = "full",
    reuse: bool = True,
    method: str | None = None,
    probe: LayerProbe | None = None,
    closed_form: bool = True,
    conditioner: Conditioner | None = None,
) -> OverfitResult:
    """Overfit `layer` on every sample of the batch separately; the model is in eval mode meanwhile.

    target="factored" returns u [B, out] with Δ ≈ u v̂ᵀ, v̂ the normalised (token-averaged) layer input,
    and never builds [B, out, in] when it can avoid it (`method`, chosen by `ocd_hf.memory.overfit_method`
    from a one-sample probe when None):

    - "factored-sgd": u is optimised directly. For 2-D layer inputs this equals full SGD exactly (every
      SGD step is δ aᵀ).
    - "rank-one-adam" (Adam, one input vector a per sample): every gradient δ_k aᵀ is rank one, so Adam's
      moments are M_k[o]·a[i] and V_k[o]·a[i]², and each step is -lr·m̂_k[o]/√v̂_k[o]·sign(a[i]) up to
      Adam's eps. The full delta is U sign(a)ᵀ: Adam runs on [B, out] and u = Δ v̂ = U ‖a‖₁/‖a‖₂.
      Elementwise the only difference to torch.optim.Adam is eps: |g| / (|g| + eps) is taken as 1.
    - "full": the full Δ is optimised (Adam on token inputs) and projected, u = Δ v̂.

    The kept energy ‖u‖²/‖Δ‖² is reported (exactly 1 for SGD on 2-D inputs, NaN where not measured).

    method="full" on a Linear / transformers Conv1D layer that sees one input vector a per sample
    ([B, in], one call per forward; `probe` tells, else a one-sample probe is run) takes the closed form
    (`closed_form_full`): every gradient is δ_k aᵀ, so Adam's moments are M_k aᵀ and V_k (a²)ᵀ and
    every step is an outer-product formula in two vectors. No per-sample Adam state is kept, only the
    layer's output gradient δ_k is backpropagated (through the layers after L), and the values are
    torch.optim.Adam's (and SGD's) up to float rounding. closed_form=False forces the general path.

    `conditioner` makes the result's I(x) from the first, unmodified pass (`MeanPool` when None); the
    methods above that use the layer's input read its mean, whatever the conditioner.
    """
    conditioner = resolve_conditioner(conditioner)
    if target not in ("full", "factored"):
        raise ValueError(f"target={target!r}; use 'full' or 'factored'.")
    factored = target == "factored"
    if factored and not (isinstance(layer, nn.Linear) or is_hf_conv1d(layer)):
        raise TypeError(
            f"target='factored' supports Linear and transformers Conv1D layers, not {type(layer).__name__}."
        )
    if method is None:
        if probe is None and factored and optimizer == "adam":
            probe = probe_layer(model, layer, inputs, forward_fn)
        method = overfit_method(layer, optimizer, target, probe)
    fits = {
        "full": True,
        "factored-sgd": factored and optimizer == "sgd",
        "rank-one-adam": factored and optimizer == "adam",
    }
    if not fits.get(method, False):
        raise ValueError(f"method={method!r} does not apply to target={target!r}, optimizer={optimizer!r}.")
    rank_one = method == "rank-one-adam"
    direct = method != "full"
    weight = layer.weight
    linear = isinstance(layer, nn.Linear) or is_hf_conv1d(layer)
    if closed_form and method == "full" and target == "full" and optimizer in ("adam", "sgd") and linear:
        if probe is None:
            probe = probe_layer(model, layer, inputs, forward_fn)
        if probe.one_vector:
            run = closed_form_full(
                model,
                layer,
                inputs,
                targets,
                loss_fn,
                forward_fn,
                steps,
                lr,
                optimizer,
                include_bias,
                reuse,
                conditioner,
            )
            delta = run.delta.transpose(1, 2) if is_hf_conv1d(layer) else run.delta
            return _result(delta, run.delta_bias, run.scale, None, run.conditioning, run.loss_before)
    with eval_mode(model):
        batch = _batch_size(inputs, targets)
        shape = (out_features(layer),) if direct else tuple(weight.shape)
        buffers = None if direct else current_pool()
        if buffers is None:
            delta = torch.zeros(batch, *shape, device=weight.device, dtype=weight.dtype, requires_grad=True)
        else:
            delta = buffers.get("delta", (batch, *shape), weight.dtype, weight.device).zero_().requires_grad_()
        delta_bias = None
        params = [delta]
        if include_bias and getattr(layer, "bias", None) is not None:
            delta_bias = torch.zeros(
                batch, *layer.bias.shape, device=weight.device, dtype=weight.dtype, requires_grad=True
            )
            params.append(delta_bias)
        fused = weight.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        stepped = params[1:] if rank_one else params
        opt = make_optimizer(stepped, optimizer, lr, fused=fused) if stepped else None
        if buffers is not None and optimizer == "adam":
            # Adam's moments from the pool, zeroed as Adam's own lazy initialisation would make them
            step_device = weight.device if opt.defaults.get("fused") else torch.device("cpu")
            opt.state[delta] = {
                "step": torch.zeros((), dtype=torch.float32, device=step_device),
                "exp_avg": buffers.get("exp_avg", delta.shape, delta.dtype, delta.device).zero_(),
                "exp_avg_sq": buffers.get("exp_avg_sq", delta.shape, delta.dtype, delta.device).zero_(),
            }
        moments = (torch.zeros_like(delta), torch.zeros_like(delta)) if rank_one else None
        # the layers before `layer` see the same inputs at every step: run them once (ocd_hf.prefix)
        with (
            reuse_prefix(model, layer, reuse, ops=True) as prefix,
            per_sample_weights(layer, delta, delta_bias, input_factor="auto" if direct else None),
        ):

            def forward() -> Any:
                with prefix.replaying():
                    return forward_fn(model, inputs)

            for step in range(steps):
                if step == 0:
                    # Δ = 0 here, so this forward is the unmodified pass: I(x) comes from it for free.
                    out, cond, cap = first_pass(conditioner, layer, forward)
                else:
                    out = forward()
                losses = check_per_sample(loss_fn(out, targets), batch)
                if step == 0:
                    loss_before = losses.detach()
                    if rank_one and cap.input_ndim != 2:
                        raise ValueError("method='rank-one-adam' needs one input vector per sample ([B, in]).")
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                losses.sum().backward(inputs=params)
                if opt is not None:
                    opt.step()
                if buffers is not None and delta.grad is not None:
                    buffers.give("grad", delta.grad)  # the next backward writes its gradient into it
                    delta.grad = None
                if rank_one:
                    _rank_one_adam_step(delta, moments, cap.layer_input, lr, step + 1)
    delta.grad = None
    delta = delta.detach()
    energy = None
    if method == "factored-sgd":
        energy = torch.full((batch,), 1.0 if cap.input_ndim == 2 else float("nan"), device=delta.device)
    elif rank_one:
        a = cap.layer_input.to(delta.dtype)
        l1, l2sq, nnz = a.abs().sum(1), a.pow(2).sum(1), (a != 0).sum(1).to(delta.dtype)
        kept = l1.pow(2) / (l2sq * nnz).clamp_min(1e-30)
        energy = torch.where(delta.pow(2).sum(1) > 0, kept, torch.zeros_like(kept))
    elif factored:
        v = cap.layer_input / cap.layer_input.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u = torch.einsum("bio,bi->bo", delta, v) if is_hf_conv1d(layer) else torch.einsum("boi,bi->bo", delta, v)
        energy = u.pow(2).sum(1) / delta.flatten(1).pow(2).sum(1).clamp_min(1e-30)
        delta = u
    scale = _row_std(delta.flatten(1), None if factored else buffers)
    return _result(delta, delta_bias, scale, energy, cond, loss_before)


def _result(
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None,
    scale: torch.Tensor,
    energy: torch.Tensor | None,
    cond: Conditioning,
    loss_before: torch.Tensor,
) -> OverfitResult:
    # a sample's std is finite exactly when all its elements are (short of overflowing squares)
    if not torch.isfinite(scale).all():
        bad = (~torch.isfinite(scale)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"Non-finite deltas for batch positions {bad[:10]} (loss before overfitting: "
            f"{loss_before[bad[:10]].tolist()}). Lower overfit_lr or check the inputs and labels."
        )
    return OverfitResult(
        delta=delta,
        delta_bias=None if delta_bias is None else delta_bias.detach(),
        scale=scale,
        energy=energy,
        layer_input=cond.layer_input,
        layer_output=cond.layer_output,
        model_output=cond.model_output,
        loss_before=loss_before,
    )


def _row_std(x: torch.Tensor, buffers: BufferPool | None = None) -> torch.Tensor:
    """Unbiased std of every row (`ocd_hf.closed_form.row_std`), its work buffer from the pool."""
    return row_std(x, None if buffers is None else buffers.get("centred", x.shape, x.dtype, x.device))


@torch.no_grad()
def _rank_one_adam_step(
    u: torch.Tensor, moments: tuple[torch.Tensor, torch.Tensor], a: torch.Tensor, lr: float, k: int
) -> None:
    """Adam step k on Δ = U sign(a)ᵀ carried as u = Δ v̂ (see `overfit_batch`, "rank-one-adam").

    u's gradient is δ·‖a‖₂ for the gradient δ at the layer's output; Adam's m̂/√v̂ is blind to that
    per-sample constant, so the moments are kept on u's gradient directly.
    """
    b1, b2 = ADAM_BETAS
    m, v = moments
    g = u.grad
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    a = a.to(u.dtype)
    l1, l2 = a.abs().sum(1, keepdim=True), a.norm(dim=1, keepdim=True)
    ratio = torch.where(v > 0, m / v.sqrt().clamp_min(torch.finfo(u.dtype).tiny), torch.zeros_like(m))
    u.sub_(ratio * (lr * math.sqrt(1 - b2**k) / (1 - b1**k)) * (l1 / l2.clamp_min(1e-30)))
    u.grad = None


def overfit_sequential(
    model: nn.Module,
    layer_name: str,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    forward_fn: ForwardFn = default_forward,
    steps: int = 3,
    lr: float = 5e-4,
    optimizer: str = "adam",
    include_bias: bool = False,
) -> torch.Tensor:
    """Slow reference, the official code's way: deepcopy the model per sample, fine-tune the layer, diff.

    Expects tensor inputs with the batch first. Returns the weight deltas [B, *W.shape].
    """
    out = []
    for b in range(targets.shape[0]):
        m = copy.deepcopy(model).eval()
        layer = m.get_submodule(layer_name)
        w0 = layer.weight.detach().clone()
        params = [layer.weight] + ([layer.bias] if include_bias and layer.bias is not None else [])
        opt = make_optimizer(params, optimizer, lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn(forward_fn(m, inputs[b : b + 1]), targets[b : b + 1]).sum()
            loss.backward()
            opt.step()
        out.append(layer.weight.detach() - w0)
    return torch.stack(out)


def overfit_all_layers(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    forward_fn: ForwardFn = default_forward,
    steps: int = 3,
    lr: float = 5e-4,
    optimizer: str = "adam",
) -> torch.Tensor:
    """Outputs after overfitting *every* parameter on each sample alone: the all-layers oracle.

    An upper bound for any single-layer method. Runs one sample at a time (each needs its own copy
    of all weights); the weights are restored after each sample and the mode after the call.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    outs = []
    with eval_mode(model):
        for b in range(targets.shape[0]):
            x, y = take(inputs, b), targets[b : b + 1]
            opt = make_optimizer(params, optimizer, lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss_fn(forward_fn(model, x), y).sum().backward()
                opt.step()
            with torch.no_grad():
                outs.append(forward_fn(model, x).detach())
                for p, w in zip(params, saved):
                    p.copy_(w)
            model.zero_grad(set_to_none=True)
    return torch.cat(outs)


def take(inputs: Any, b: int) -> Any:
    """Sample b of a batch (tensors, dicts, lists / tuples of them), keeping the batch dimension."""
    return take_range(inputs, b, b + 1)


def take_range(inputs: Any, start: int, stop: int) -> Any:
    """Samples [start, stop) of a batch (tensors, dicts, lists / tuples of them)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[start:stop]
    if isinstance(inputs, dict) or hasattr(inputs, "items"):
        return {k: take_range(v, start, stop) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        if inputs and all(isinstance(v, (torch.Tensor, dict)) for v in inputs):
            return type(inputs)(take_range(v, start, stop) for v in inputs)
        return inputs[start:stop]  # a list of raw samples, e.g. strings
    return inputs


def _batch_size(inputs: Any, targets: torch.Tensor) -> int:
    if isinstance(targets, torch.Tensor):
        return targets.shape[0]
    raise TypeError(f"targets must be a tensor with the batch first; got {type(targets).__name__}.")
