"""`ModelAdapter`: the small set of questions OCD asks of a model family. Plain PyTorch is the default.

`get_adapter(model)` picks the family by the model's class (SetFit, sentence-transformers, transformers,
timm, else plain PyTorch). The family modules import their library only when such a model is given: a
class from a library can only exist once that library is imported, so detection reads class names and
never imports timm, setfit or sentence-transformers itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..per_sample import is_supported

SUPPORTED_FAMILIES = (
    "plain PyTorch (torch.nn.Module)",
    "transformers (PreTrainedModel, e.g. AutoModelForSequenceClassification / AutoModelForImageClassification)",
    "timm (timm.create_model)",
    "sentence-transformers (SentenceTransformer)",
    "SetFit (SetFitModel, differentiable or LogisticRegression head)",
)


class ModelAdapter:
    """Plain PyTorch: batches are `(inputs, targets)` pairs (or dicts with a `labels` key); f(x) = model(x)."""

    family = "torch"
    default_loss: str | None = None
    # A layer the family suggests when the user has no better idea (e.g. a timm model's classifier).
    preferred_layer: str | None = None

    def __init__(self, model: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(unsupported_message(model))
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

    def prepare_inputs(self, inputs: Any) -> Any:
        """Inputs as the user gives them at inference (e.g. raw strings) -> what `forward` runs on, on the model's device."""
        return self.to_device(inputs, module_device(self.module))

    def decode(self, indices: torch.Tensor) -> Any:
        """Predicted class indices -> the family's predictions (SetFit maps them to its labels)."""
        return indices

    def candidate_layers(self) -> dict[str, nn.Module]:
        """Every module whose weight OCD can generate, by name.

        Conv layers whose class replaces nn.Conv's forward (e.g. timm's `Conv2dSame`, which pads inside its
        forward) are left out: the per-sample hook sees their unpadded input.
        """
        return {name: m for name, m in self.module.named_modules() if name and is_supported(m) and not custom_conv(m)}

    def describe(self) -> dict[str, str | None]:
        """Provenance written into the config: model id and library."""
        return {
            "base_model": getattr(getattr(self.module, "config", None), "_name_or_path", None)
            or type(self.module).__name__,
            "base_model_library": "torch",
        }


# ---------------------------------------------------------------------------------------------- helpers
def custom_conv(m: nn.Module) -> bool:
    """A Conv1d/Conv2d subclass with its own forward (its input is transformed before the convolution)."""
    for base in (nn.Conv1d, nn.Conv2d):
        if isinstance(m, base):
            return type(m).forward is not base.forward
    return False


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def iter_batches(inputs: Any, batch_size: int) -> Iterator[Any]:
    """Slices of at most `batch_size` samples of a tensor, a sequence (e.g. strings) or a dict of those."""
    n = batch_length(inputs)
    for start in range(0, n, batch_size):
        yield slice_batch(inputs, start, min(start + batch_size, n))


def batch_length(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        lengths = {batch_length(v) for v in inputs.values() if isinstance(v, (torch.Tensor, list, tuple))}
        if len(lengths) != 1:
            raise ValueError(f"Cannot tell the batch size of a dict whose entries have lengths {sorted(lengths)}.")
        return lengths.pop()
    if isinstance(inputs, (torch.Tensor, Sequence)) and not isinstance(inputs, str):
        return len(inputs)
    raise TypeError(f"Cannot split a {type(inputs).__name__} into batches; pass a tensor, a list or a dict of those.")


def slice_batch(inputs: Any, start: int, stop: int) -> Any:
    if isinstance(inputs, Mapping):
        return {
            k: slice_batch(v, start, stop) if isinstance(v, (torch.Tensor, list, tuple)) else v
            for k, v in inputs.items()
        }
    return inputs[start:stop]


def _class_from(model: Any, library: str, name: str) -> bool:
    """Whether a class called `name` defined in `library` is among the model's classes (imports nothing)."""
    return any(c.__name__ == name and c.__module__.split(".")[0] == library for c in type(model).__mro__)


def detect_family(model: Any) -> str:
    """ "setfit", "sentence-transformers", "transformers", "timm" or "torch"; raises TypeError for anything else."""
    if _class_from(model, "setfit", "SetFitModel"):
        return "setfit"
    if _class_from(model, "sentence_transformers", "SentenceTransformer"):
        return "sentence-transformers"
    if not isinstance(model, nn.Module):
        raise TypeError(unsupported_message(model))
    if _class_from(model, "transformers", "PreTrainedModel"):
        return "transformers"
    if any(c.__module__.split(".")[0] == "timm" for c in type(model).__mro__[:-2]) or (
        hasattr(model, "pretrained_cfg") and callable(getattr(model, "get_classifier", None))
    ):
        return "timm"
    return "torch"


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


def get_adapter(model: Any) -> ModelAdapter:
    """The adapter for a model's family; an adapter passed in is returned as it is."""
    if isinstance(model, ModelAdapter):
        return model
    family = detect_family(model)
    if family == "setfit":
        from .setfit import SetFitAdapter

        return SetFitAdapter(model)
    if family == "sentence-transformers":
        from .sentence_transformers import SentenceTransformerAdapter

        return SentenceTransformerAdapter(model)
    if family == "transformers":
        from .transformers import TransformersAdapter

        return TransformersAdapter(model)
    if family == "timm":
        from .timm import TimmAdapter

        return TimmAdapter(model)
    return ModelAdapter(model)
