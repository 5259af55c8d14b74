"""Per-sample overfitting (Alg. 1), vectorized over the batch.

Δ is one [B, *W.shape] leaf tensor applied through `per_sample_weights`; the loss is the *sum* of the
per-sample losses, so Δ_b receives only sample b's gradient. Adam and SGD are elementwise, so one
optimizer over Δ is exactly B independent per-sample optimizers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import capture_layer, pool
from .layers import is_hf_conv1d
from .losses import LossFn
from .modes import eval_mode
from .per_sample import out_features, per_sample_weights
from .prefix import reuse_prefix

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]


def default_forward(model: nn.Module, inputs: Any) -> torch.Tensor:
    return model(inputs)


@dataclass
class OverfitResult:
    """Deltas and conditioning of one batch. `scale` is ρ_s = std(Δ_s), the scale net's target."""

    delta: torch.Tensor
    delta_bias: torch.Tensor | None
    scale: torch.Tensor
    layer_input: torch.Tensor
    layer_output: torch.Tensor
    model_output: torch.Tensor
    loss_before: torch.Tensor
    # target="factored": fraction of ‖Δ‖² that u v̂ᵀ keeps (1 where exact, NaN where not measured)
    energy: torch.Tensor | None = None


def make_optimizer(params: list[torch.Tensor], name: str, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    if name == "adam":
        # the fused kernel makes one pass over memory per step instead of several, with the same update
        # rule; collection speed is measured in docs/results.md
        if fused:
            try:
                return torch.optim.Adam(params, lr=lr, fused=True)
            except RuntimeError:  # a device / dtype without the fused kernel
                pass
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"Unknown overfit optimizer {name!r}; use 'adam' or 'sgd'.")


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
) -> OverfitResult:
    """Overfit `layer` on every sample of the batch separately; the model is in eval mode meanwhile.

    target="factored" returns u [B, out] with Δ ≈ u v̂ᵀ, v̂ the normalised (token-averaged) layer input.
    With SGD the optimisation runs on u directly and never builds [B, out, in]: for 2-D layer inputs
    this equals full SGD exactly (every SGD step is δ aᵀ). With Adam the full Δ is optimised and then
    projected, u = Δ v̂, and the kept energy ‖u‖²/‖Δ‖² is reported.
    """
    if target not in ("full", "factored"):
        raise ValueError(f"target={target!r}; use 'full' or 'factored'.")
    factored = target == "factored"
    direct = factored and optimizer == "sgd"
    if factored and not (isinstance(layer, nn.Linear) or is_hf_conv1d(layer)):
        raise TypeError(
            f"target='factored' supports Linear and transformers Conv1D layers, not {type(layer).__name__}."
        )
    weight = layer.weight
    with eval_mode(model):
        batch = _batch_size(inputs, targets)
        shape = (out_features(layer),) if direct else tuple(weight.shape)
        delta = torch.zeros(batch, *shape, device=weight.device, dtype=weight.dtype, requires_grad=True)
        delta_bias = None
        params = [delta]
        if include_bias and getattr(layer, "bias", None) is not None:
            delta_bias = torch.zeros(
                batch, *layer.bias.shape, device=weight.device, dtype=weight.dtype, requires_grad=True
            )
            params.append(delta_bias)
        opt = make_optimizer(
            params, optimizer, lr, fused=weight.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        )
        # the layers before `layer` see the same inputs at every step: run them once (ocd_hf.prefix)
        with (
            reuse_prefix(model, layer, reuse),
            per_sample_weights(layer, delta, delta_bias, input_factor="auto" if direct else None),
        ):
            for step in range(steps):
                if step == 0:
                    # Δ = 0 here, so this forward is the unmodified pass: I(x) comes from it for free.
                    with capture_layer(layer) as cap:
                        out = forward_fn(model, inputs)
                    model_output = pool(out)
                else:
                    out = forward_fn(model, inputs)
                losses = loss_fn(out, targets)
                if losses.dim() != 1 or losses.shape[0] != batch:
                    raise ValueError(
                        f"The loss must return one value per sample ([{batch}]); got {tuple(losses.shape)}."
                    )
                if step == 0:
                    loss_before = losses.detach()
                opt.zero_grad(set_to_none=True)
                losses.sum().backward(inputs=params)
                opt.step()
    delta = delta.detach()
    if not torch.isfinite(delta).all():
        bad = (~torch.isfinite(delta.flatten(1))).any(dim=1).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"Non-finite deltas for batch positions {bad[:10]} (loss before overfitting: "
            f"{loss_before[bad[:10]].tolist()}). Lower overfit_lr or check the inputs and labels."
        )
    energy = None
    if direct:
        energy = torch.full((batch,), 1.0 if cap.input_ndim == 2 else float("nan"), device=delta.device)
    elif factored:
        v = cap.layer_input / cap.layer_input.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u = torch.einsum("bio,bi->bo", delta, v) if is_hf_conv1d(layer) else torch.einsum("boi,bi->bo", delta, v)
        energy = u.pow(2).sum(1) / delta.flatten(1).pow(2).sum(1).clamp_min(1e-30)
        delta = u
    return OverfitResult(
        delta=delta,
        delta_bias=None if delta_bias is None else delta_bias.detach(),
        scale=delta.flatten(1).std(dim=1),
        energy=energy,
        layer_input=cap.layer_input,
        layer_output=cap.layer_output,
        model_output=model_output,
        loss_before=loss_before,
    )


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
    if isinstance(inputs, torch.Tensor):
        return inputs[b : b + 1]
    if isinstance(inputs, dict) or hasattr(inputs, "items"):
        return {k: take(v, b) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        if inputs and all(isinstance(v, (torch.Tensor, dict)) for v in inputs):
            return type(inputs)(take(v, b) for v in inputs)
        return inputs[b : b + 1]  # a list of raw samples, e.g. strings
    return inputs


def _batch_size(inputs: Any, targets: torch.Tensor) -> int:
    if isinstance(targets, torch.Tensor):
        return targets.shape[0]
    raise TypeError(f"targets must be a tensor with the batch first; got {type(targets).__name__}.")
