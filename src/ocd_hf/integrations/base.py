"""`ModelAdapter`: the small set of questions OCD asks of a model family. Plain PyTorch is the default."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..per_sample import is_supported


class ModelAdapter:
    """Plain PyTorch: batches are `(inputs, targets)` pairs (or dicts with a `labels` key); f(x) = model(x)."""

    family = "torch"
    default_loss: str | None = None

    def __init__(self, model: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"OCD wraps torch.nn.Module models (plain PyTorch, transformers, timm, sentence-transformers) "
                f"and SetFitModel; got {type(model).__name__}."
            )
        self.model = model

    @property
    def module(self) -> nn.Module:
        """The nn.Module whose layers OCD can target (and whose mode OCD switches)."""
        return self.model

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            if "labels" not in batch:
                raise ValueError(f"A dict batch needs a 'labels' entry; got keys {sorted(batch)}.")
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            return inputs, batch["labels"]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError("Batches must be (inputs, targets) pairs or dicts with a 'labels' key.")

    def forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        """f(x): the tensor the loss and the conditioning use (e.g. logits)."""
        out = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
        return self.output_tensor(out)

    @staticmethod
    def output_tensor(out: Any) -> torch.Tensor:
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
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        if isinstance(batch, Mapping):
            return {k: self.to_device(v, device) for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.to_device(v, device) for v in batch)
        return batch

    def collate_fn(self):
        return None

    def candidate_layers(self) -> dict[str, nn.Module]:
        """Every module whose weight OCD can generate, by name."""
        return {name: m for name, m in self.module.named_modules() if name and is_supported(m)}

    def describe(self) -> dict[str, str | None]:
        """Provenance written into the config: model id and library."""
        return {"base_model": getattr(getattr(self.module, "config", None), "_name_or_path", None) or type(self.module).__name__,
                "base_model_library": "torch"}


def get_adapter(model: Any) -> ModelAdapter:
    """The adapter for a model's family (more families live beside this module)."""
    return ModelAdapter(model)
