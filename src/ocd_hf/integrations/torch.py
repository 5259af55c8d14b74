"""Plain PyTorch models: batches are `(inputs, targets)` pairs or dicts with a label entry; f(x) = model(x)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import ModelAdapter
from .batches import LABEL_KEYS, split_dict_batch


class TorchAdapter(ModelAdapter):
    """Any `torch.nn.Module`: the fallback family."""

    family = "torch"

    def __init__(self, model: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchAdapter wraps a torch.nn.Module; got a {type(model).__name__}.")
        super().__init__(model)

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            return split_dict_batch(batch, f"A dict batch needs a label entry (one of {list(LABEL_KEYS)})")
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError("Batches must be (inputs, targets) pairs or dicts with a 'labels' entry.")

    def forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        out = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
        return self.output_tensor(out)
