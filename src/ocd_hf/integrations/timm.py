"""timm models: image tensors in, logits out, cross-entropy.

Batches are `(images, labels)` pairs or dicts with an image entry ("pixel_values", "image", "images" or
"x") and "label" / "labels". The classifier (`get_classifier()`, named by `pretrained_cfg["classifier"]`)
is `preferred_layer`. Conv layers that pad inside their own forward (`Conv2dSame` in the `tf_` models)
are not candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .batches import LABEL_KEYS
from .torch import TorchAdapter

IMAGE_KEYS = ("pixel_values", "image", "images", "x")


class TimmAdapter(TorchAdapter):
    family = "timm"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.preferred_layer = classifier_name(model)
        self.default_loss = (
            "cross_entropy" if self.preferred_layer is not None or getattr(model, "num_classes", 0) else None
        )

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            x = next((batch[k] for k in IMAGE_KEYS if k in batch), None)
            y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
            if x is None or y is None:
                raise ValueError(
                    f"A dict batch for a timm model needs an image entry {list(IMAGE_KEYS)} and a label entry "
                    f"{list(LABEL_KEYS)}; got keys {sorted(batch)}."
                )
            return x, y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
        return super().split_batch(batch)

    def forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, Mapping):  # {"pixel_values": x}, as image processors return it
            key = next((k for k in IMAGE_KEYS if k in inputs), None)
            if key is None:
                raise ValueError(
                    f"A dict input for a timm model needs one of {list(IMAGE_KEYS)}; got {sorted(inputs)}."
                )
            inputs = inputs[key]
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 3:
            raise ValueError(
                f"timm models take a batch of images [B, C, H, W]; got one image {tuple(inputs.shape)}: pass x.unsqueeze(0)."
            )
        return super().forward(module, inputs)

    def describe(self) -> dict[str, str | None]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        name = cfg.get("hf_hub_id") or cfg.get("architecture") or type(self.model).__name__
        return {"base_model": name, "base_model_library": "timm"}


def classifier_name(model: nn.Module) -> str | None:
    """The classifier's module name: pretrained_cfg["classifier"] if it is a supported layer, else get_classifier()."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    for name in [names] if isinstance(names, str) else list(names or ()):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return name
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module):
        for name, m in model.named_modules():
            if m is head and isinstance(m, (nn.Linear, nn.Conv2d)):
                return name
    return None
