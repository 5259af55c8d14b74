"""The adapter registry: which `ModelAdapter` serves a given model.

Families are detected by class names along the model's MRO, so detection never imports timm, setfit,
sentence-transformers or transformers; an adapter class registered as "module:Class" is imported only
when a model of its family is wrapped. Later registrations (and higher priorities) are tried first;
plain PyTorch is the fallback for any other nn.Module.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .base import ModelAdapter
from .torch import TorchAdapter

SUPPORTED_FAMILIES = (
    "plain PyTorch (torch.nn.Module)",
    "transformers (PreTrainedModel, e.g. AutoModelForSequenceClassification / AutoModelForImageClassification)",
    "timm (timm.create_model)",
    "sentence-transformers (SentenceTransformer)",
    "SetFit (SetFitModel, differentiable or LogisticRegression head)",
)


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    detect: Callable[[Any], bool]
    adapter: type[ModelAdapter] | str
    priority: int

    def load(self) -> type[ModelAdapter]:
        if isinstance(self.adapter, str):
            module, _, cls = self.adapter.partition(":")
            return getattr(importlib.import_module(module), cls)
        return self.adapter


_REGISTRY: list[AdapterEntry] = []


def register_adapter(
    name: str, detect: Callable[[Any], bool], adapter: type[ModelAdapter] | str, *, priority: int = 0
) -> None:
    """Register a model family.

    Args:
        name: The family's name (replaces an earlier entry of that name).
        detect: True for models of this family; must not import the family's library.
        adapter: A `ModelAdapter` subclass, or "package.module:Class" to import it lazily.
        priority: Entries are tried from the highest priority down, newest first within one priority.
    """
    _REGISTRY[:] = [e for e in _REGISTRY if e.name != name]
    _REGISTRY.insert(0, AdapterEntry(name, detect, adapter, priority))
    _REGISTRY.sort(key=lambda e: -e.priority)


def detect_family(model: Any) -> str:
    """The registered family of `model` ("torch" for any other nn.Module); TypeError for anything else."""
    for entry in _REGISTRY:
        if entry.detect(model):
            return entry.name
    if isinstance(model, nn.Module):
        return TorchAdapter.family
    raise TypeError(unsupported_message(model))


def get_adapter(model: Any, **kwargs: Any) -> ModelAdapter:
    """The adapter for a model's family (an adapter passed in is returned as it is).

    Args:
        model: The model, or an adapter already built (e.g. `TransformersAdapter(model, tokenizer=tok)`).
        **kwargs: Passed to the adapter's constructor (e.g. `tokenizer=` for transformers models).
    """
    if isinstance(model, ModelAdapter):
        return model
    family = detect_family(model)
    entry = next((e for e in _REGISTRY if e.name == family), None)
    cls = entry.load() if entry is not None else TorchAdapter
    accepted = inspect.signature(cls.__init__).parameters
    extra = [k for k in kwargs if k not in accepted]
    if extra:
        raise TypeError(
            f"{extra} do not apply to a {family} model ({cls.__name__} takes {[p for p in accepted if p not in ('self', 'model')]}); "
            "tokenizer= is for transformers models (SetFit and sentence-transformers tokenize by themselves)."
        )
    return cls(model, **kwargs)


def class_from(model: Any, library: str, name: str) -> bool:
    """Whether a class called `name` defined in `library` is among the model's classes (imports nothing)."""
    return any(c.__name__ == name and c.__module__.split(".")[0] == library for c in type(model).__mro__)


def _is_timm(model: Any) -> bool:
    return isinstance(model, nn.Module) and (
        any(c.__module__.split(".")[0] == "timm" for c in type(model).__mro__[:-2])
        or (hasattr(model, "pretrained_cfg") and callable(getattr(model, "get_classifier", None)))
    )


def unsupported_message(model: Any) -> str:
    kind = f"{type(model).__module__}.{type(model).__name__}"
    hint = ""
    if type(model).__name__.startswith(("TF", "Flax")):
        hint = " TensorFlow / Flax models are not supported; load the PyTorch class instead."
    return (
        f"OCD cannot wrap a {kind}: it wraps torch.nn.Module models and these families: "
        + "; ".join(SUPPORTED_FAMILIES)
        + "."
        + hint
    )


_PKG = __name__.rpartition(".")[0]
register_adapter("timm", _is_timm, f"{_PKG}.timm:TimmAdapter", priority=-10)
register_adapter(
    "transformers",
    lambda m: isinstance(m, nn.Module) and class_from(m, "transformers", "PreTrainedModel"),
    f"{_PKG}.transformers:TransformersAdapter",
)
register_adapter(
    "sentence-transformers",
    lambda m: class_from(m, "sentence_transformers", "SentenceTransformer"),
    f"{_PKG}.sentence_transformers:SentenceTransformerAdapter",
    priority=10,
)
register_adapter(
    "setfit", lambda m: class_from(m, "setfit", "SetFitModel"), f"{_PKG}.setfit:SetFitAdapter", priority=20
)
