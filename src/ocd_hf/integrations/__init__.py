"""How each model family feeds batches, produces f(x), computes its loss and lists candidate layers."""

from .base import ModelAdapter, get_adapter

__all__ = ["ModelAdapter", "get_adapter"]
