"""The target layer: which modules OCD supports, finding one by name, and fingerprinting its weight."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

SUPPORTED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv1D (transformers)")


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D, detected without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_supported(module: nn.Module) -> bool:
    """Whether OCD can generate per-sample weights for `module`."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.padding_mode == "zeros"
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def custom_conv(module: nn.Module) -> bool:
    """A Conv1d/Conv2d subclass with its own forward (e.g. timm's Conv2dSame pads inside it), which the
    per-sample hook cannot follow."""
    for base in (nn.Conv1d, nn.Conv2d):
        if isinstance(module, base):
            return type(module).forward is not base.forward
    return False


def check_supported(module: nn.Module, name: str = "layer") -> None:
    """Raise TypeError naming the supported layer types when `module` is not one of them."""
    if not is_supported(module):
        extra = ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            extra = f" (padding_mode={module.padding_mode!r}; only 'zeros' is supported)"
        raise TypeError(
            f"Layer {name!r} is a {type(module).__name__}{extra}; OCD can generate weights for "
            f"{', '.join(SUPPORTED_TYPES)} layers only. Pick one of those (see OCDWrapper.candidate_layers)."
        )


def resolve_layer(
    module: nn.Module, name: str | None, candidates: Callable[[], Iterable[str]] | None = None
) -> nn.Module:
    """The submodule called `name`, checked to be a layer OCD supports.

    Args:
        module: The model's root module.
        name: Dotted name as in `module.named_modules()`.
        candidates: Lists the valid names for the error message when `name` is not found.
    """
    if name is None:
        cands = list(candidates())[:20] if candidates is not None else []
        raise ValueError(f"No target layer given: pass layer='name' or layer='auto'. Candidate layers: {cands}")
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        cands = list(candidates()) if candidates is not None else []
        raise ValueError(f"No layer named {name!r} in {type(module).__name__}. Candidate layers: {cands}") from None
    check_supported(layer, name)
    return layer


def layer_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the weight's float32 bytes on CPU: ties a head to the exact base weights."""
    return hashlib.sha256(weight.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


# Above this many weights a full-delta head is slow to train on a CPU (docs/integrations.md, "Tried on
# real models"); layer="auto" does not weigh cost, so its choice is flagged.
LARGE_LAYER_WEIGHTS = 100_000


def warn_if_large(name: str, layer: nn.Module, target: str) -> None:
    """Warn when layer="auto" chose a layer whose full-delta head will be slow to train."""
    n = layer.weight.numel()
    if target == "full" and n > LARGE_LAYER_WEIGHTS:
        warnings.warn(
            f"layer='auto' chose {name!r} ({type(layer).__name__} {tuple(layer.weight.shape)}, {n:,} weights): a "
            "full-delta head on it trains slowly on a CPU (seconds per step). Pass target='factored' (one vector "
            "per sample), or name a smaller layer (OCDWrapper.candidate_layers(model)).",
            UserWarning,
            stacklevel=2,
        )
