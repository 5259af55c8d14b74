"""Per-sample losses. Every loss returns one value per sample ([B]) so that summing them gives each
per-sample delta exactly its own sample's gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_per_sample(losses: torch.Tensor, batch: int) -> torch.Tensor:
    """`losses` unchanged when it holds one value per sample ([batch]); a clear error otherwise."""
    if losses.dim() != 1 or losses.shape[0] != batch:
        raise ValueError(f"The loss must return one value per sample ([{batch}]); got {tuple(losses.shape)}.")
    return losses


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if output.dim() < 2:
        raise ValueError(f"cross_entropy needs logits of shape [B, C]; got {tuple(output.shape)}.")
    if target.dtype.is_floating_point and target.shape == output.shape:
        return F.cross_entropy(output, target, reduction="none")  # soft labels
    if target.dim() != 1 or target.shape[0] != output.shape[0]:
        raise ValueError(
            f"cross_entropy needs integer class labels of shape [B] = [{output.shape[0]}] for logits "
            f"{tuple(output.shape)}; got labels of shape {tuple(target.shape)}. Pass loss='mse' for regression."
        )
    return F.cross_entropy(output, target.long(), reduction="none")


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.to(output.dtype)
    if target.shape != output.shape:
        if target.numel() == output.numel() and target.shape[0] == output.shape[0]:
            target = target.reshape(output.shape)
        else:
            raise ValueError(
                f"mse needs targets shaped like the output {tuple(output.shape)}; got {tuple(target.shape)}."
            )
    return (output - target).pow(2).flatten(1).mean(dim=1) if output.dim() > 1 else (output - target).pow(2)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


def resolve_loss(loss: str | LossFn) -> LossFn:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; use one of {sorted(LOSSES)} or a callable(output, target) -> [B].")
    return LOSSES[loss]
