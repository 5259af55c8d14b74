"""Plain PyTorch models: batches are `(inputs, targets)` pairs or dicts with a label entry; f(x) = model(x)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .base import ModelAdapter
from .batches import LABEL_KEYS, label_key


class TorchAdapter(ModelAdapter):
    """Any `torch.nn.Module`: the fallback family."""

    family = "torch"

    def __init__(self, model: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchAdapter wraps a torch.nn.Module; got a {type(model).__name__}.")
        super().__init__(model)

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            key = label_key(batch)
            if key is None:
                raise ValueError(
                    f"A dict batch needs a label entry (one of {list(LABEL_KEYS)}); got keys {sorted(batch)}."
                )
            labels = batch[key]
            inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
            return inputs, labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError("Batches must be (inputs, targets) pairs or dicts with a 'labels' entry.")

    def forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        out = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
        return self.output_tensor(out)
