"""`ModelAdapter`: the small set of questions OCD asks of a model family.

A family implements `split_batch` (a batch → inputs and targets) and `forward` (inputs → the tensor f(x)
that the loss and the conditioning use); the rest has defaults that fit plain PyTorch. Families are
registered in `ocd_hf.integrations.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..layers import custom_conv, is_supported
from .batches import module_device, to_device


class ModelAdapter(ABC):
    """How OCD feeds one model family: batches, forward, loss default, candidate layers, provenance.

    Args:
        model: The user's model (an nn.Module, or e.g. a SetFitModel for families that wrap one).

    Attributes:
        family: Name of the family (as registered).
        default_loss: Loss used when the user names none ("cross_entropy", "mse" or None).
        preferred_layer: A layer the family suggests (e.g. a timm model's classifier).
    """

    family: str = "abstract"
    default_loss: str | None = None
    preferred_layer: str | None = None

    def __init__(self, model: Any):
        self.model = model

    @property
    def module(self) -> nn.Module:
        """The nn.Module whose layers OCD can target (and whose mode OCD switches)."""
        return self.model

    @abstractmethod
    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """A collated batch -> (inputs, targets)."""

    @abstractmethod
    def forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        """f(x): the tensor the loss and the conditioning use (e.g. logits)."""

    @staticmethod
    def output_tensor(out: Any) -> torch.Tensor:
        """The main tensor of a model output (a tensor, `logits`, `sentence_embedding`, ... or the first item)."""
        if isinstance(out, torch.Tensor):
            return out
        for key in ("logits", "sentence_embedding", "last_hidden_state"):
            v = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
            if isinstance(v, torch.Tensor):
                return v
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise TypeError(f"Cannot find an output tensor in a {type(out).__name__}; pass a forward_fn.")

    def to_device(self, batch: Any, device: torch.device) -> Any:
        return to_device(batch, device)

    def collate_fn(self) -> Callable | None:
        """The DataLoader collate function for this family's datasets (None: torch's default)."""
        return None

    def prepare_inputs(self, inputs: Any) -> Any:
        """Inputs as the user gives them at inference (e.g. raw strings) -> what `forward` runs on, on the model's device."""
        return self.to_device(inputs, module_device(self.module))

    def decode(self, indices: torch.Tensor) -> Any:
        """Predicted class indices -> the family's predictions (SetFit maps them to its labels)."""
        return indices

    def candidate_layers(self) -> dict[str, nn.Module]:
        """Every module whose weight OCD can generate, by name (convs with their own forward are left out)."""
        return {name: m for name, m in self.module.named_modules() if name and is_supported(m) and not custom_conv(m)}

    def describe(self) -> dict[str, str | None]:
        """Provenance written with the head: model id and library."""
        cfg = getattr(self.module, "config", None)
        return {
            "base_model": getattr(cfg, "_name_or_path", None) or type(self.module).__name__,
            "base_model_library": self.family,
        }
