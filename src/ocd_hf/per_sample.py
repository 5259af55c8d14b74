"""Per-sample weights inside one batched forward: sample b runs the layer with W + Δ_b.

The hook adds only the delta's contribution to the layer's normal output, so the base computation is
not repeated and gradients flow to Δ alone. Supported: nn.Linear (any number of token dims),
nn.Conv1d / nn.Conv2d (grouped convolution, groups = B·groups) and transformers' `Conv1D`
(GPT-2 style, weight stored as [in, out]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .buffers import BufferPool, current_pool
from .layers import check_supported, is_hf_conv1d


def delta_output(
    module: nn.Module, x: torch.Tensor, delta: torch.Tensor, delta_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The change of `module(x)` when sample b's weight becomes W + delta[b] (and bias + delta_bias[b])."""
    if x.shape[0] != delta.shape[0]:
        raise ValueError(
            f"Batch of {x.shape[0]} inputs reached the target layer but {delta.shape[0]} per-sample deltas were "
            "given; the layer's input must have the batch as its first dimension and match the deltas."
        )
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        # bmm with the delta as the left factor (Linear) makes the delta's gradient a contiguous bmm
        # result; einsum's permuted one had to be copied again before it was accumulated
        b, d = x.shape[0], delta.to(x.dtype)
        tokens = x.reshape(b, -1, x.shape[-1])  # [B, T, in]
        pool = current_pool()
        if isinstance(module, nn.Linear) and pool is not None and d.requires_grad:
            out = _PooledLinearDelta.apply(tokens, d, pool)
        elif isinstance(module, nn.Linear):
            out = torch.bmm(d, tokens.transpose(1, 2)).transpose(1, 2)  # [B, T, out]
        else:  # transformers Conv1D: the delta is [B, in, out]
            out = torch.bmm(tokens, d)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        if delta_bias is not None:
            out = out + delta_bias.to(x.dtype).view(delta_bias.shape[0], *([1] * (out.dim() - 2)), -1)
        return out
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        b = x.shape[0]
        # One grouped convolution: the batch becomes groups so each sample meets only its own kernel.
        xg = x.reshape(1, b * x.shape[1], *x.shape[2:])
        wg = delta.to(x.dtype).reshape(b * delta.shape[1], *delta.shape[2:])
        out = conv(xg, wg, None, module.stride, module.padding, module.dilation, b * module.groups)
        out = out.reshape(b, delta.shape[1], *out.shape[2:])
        if delta_bias is not None:
            out = out + delta_bias.to(x.dtype).view(b, -1, *([1] * (out.dim() - 2)))
        return out
    check_supported(module)
    raise AssertionError("unreachable")


class _PooledLinearDelta(torch.autograd.Function):
    """tokens [B, T, in] through per-sample deltas [B, out, in] -> [B, T, out], as the plain bmm does.

    The delta's gradient is the same bmm as autograd's, written into a buffer taken from the pool;
    autograd adopts it as the delta's .grad, and `overfit_batch` gives it back after the optimizer step.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, d: torch.Tensor, pool: BufferPool) -> torch.Tensor:
        ctx.save_for_backward(tokens, d)
        ctx.pool = pool
        return torch.bmm(d, tokens.transpose(1, 2)).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        tokens, d = ctx.saved_tensors
        grad_out = grad.transpose(1, 2)  # [B, out, T]
        grad_d = grad_tokens = None
        if ctx.needs_input_grad[1]:
            grad_d = torch.bmm(grad_out, tokens, out=ctx.pool.take("grad", d.shape, d.dtype, d.device))
        if ctx.needs_input_grad[0]:
            grad_tokens = torch.bmm(grad_out.transpose(1, 2), d)
        return grad_tokens, grad_d, None


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_hf_conv1d(module) else module.weight.shape[0]


def input_direction(x: torch.Tensor) -> torch.Tensor:
    """v̂: the layer input averaged over token dims and normalised, [B, in] (the factored delta's input side)."""
    v = x.detach().flatten(1, -2).mean(1) if x.dim() > 2 else x.detach()
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def factored_delta_output(module: nn.Module, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output change for ΔW_b = u_b v_bᵀ, without building ΔW: Δy_t = u_b (v_bᵀ x_t)."""
    if not (isinstance(module, nn.Linear) or is_hf_conv1d(module)):
        raise TypeError(
            f"target='factored' supports Linear and transformers Conv1D layers; {type(module).__name__} needs target='full'."
        )
    if x.shape[0] != u.shape[0]:
        raise ValueError(
            f"Batch of {x.shape[0]} inputs reached the target layer but {u.shape[0]} per-sample deltas were given."
        )
    proj = torch.einsum("b...i,bi->b...", x, v.to(x.dtype))
    return proj.unsqueeze(-1) * u.to(x.dtype).view(u.shape[0], *([1] * (x.dim() - 2)), -1)


def factored_to_full(module: nn.Module, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u vᵀ laid out like the layer's weight ([out, in], or [in, out] for transformers Conv1D)."""
    full = torch.einsum("bo,bi->boi", u, v)
    return full.transpose(1, 2) if is_hf_conv1d(module) else full


@contextlib.contextmanager
def per_sample_weights(
    module: nn.Module,
    delta: torch.Tensor,
    delta_bias: torch.Tensor | None = None,
    input_factor: torch.Tensor | str | None = None,
) -> Iterator[None]:
    """Within the block, every forward of `module` uses W + delta[b] for batch element b.

    `delta` has shape [B, *module.weight.shape]. With `input_factor`, delta is a factor u [B, out] and
    sample b's weight is W + u_b v_bᵀ; input_factor="auto" takes v̂ from the input the layer sees
    (`input_direction`), a tensor [B, in] gives v explicitly. The hook is removed on exit, also after
    an error.
    """
    check_supported(module)
    if input_factor is None and tuple(delta.shape[1:]) != tuple(module.weight.shape):
        raise ValueError(
            f"Deltas of shape {tuple(delta.shape[1:])} do not fit a layer whose weight is {tuple(module.weight.shape)}."
        )
    if input_factor is not None and tuple(delta.shape[1:]) != (out_features(module),):
        raise ValueError(f"Factored deltas must be [B, {out_features(module)}]; got {tuple(delta.shape)}.")

    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if input_factor is None:
            return output + delta_output(mod, x, delta, delta_bias)
        v = input_direction(x) if isinstance(input_factor, str) else input_factor
        out = output + factored_delta_output(mod, x, delta, v)
        if delta_bias is not None:
            out = out + delta_bias.to(x.dtype).view(delta_bias.shape[0], *([1] * (out.dim() - 2)), -1)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
