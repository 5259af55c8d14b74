"""How each model family feeds batches, produces f(x), computes its loss and lists candidate layers."""

from .base import ModelAdapter
from .registry import detect_family, get_adapter, register_adapter
from .torch import TorchAdapter

__all__ = ["ModelAdapter", "TorchAdapter", "detect_family", "get_adapter", "register_adapter"]
