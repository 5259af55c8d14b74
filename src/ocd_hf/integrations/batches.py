"""Batch helpers shared by every model family: label keys, devices, slicing inputs into batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

# Names a label column goes by, in the order they are looked up, for every family.
LABEL_KEYS = ("labels", "label", "label_ids", "y")


def label_key(batch: Mapping) -> str | None:
    """The first of `LABEL_KEYS` present in a dict batch."""
    return next((k for k in LABEL_KEYS if k in batch), None)


def split_dict_batch(batch: Mapping, missing: str, tensors_only: bool = False) -> tuple[dict, torch.Tensor]:
    """A dict batch -> (inputs without the label entries, labels as a tensor).

    Args:
        batch: The collated dict.
        missing: The error message's start when no label entry is present (the keys are appended).
        tensors_only: Keep only tensor inputs (e.g. drop raw text columns a tokenizer already consumed).
    """
    key = label_key(batch)
    if key is None:
        raise ValueError(f"{missing}; got keys {sorted(batch)}.")
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS and (not tensors_only or torch.is_tensor(v))}
    labels = batch[key]
    return inputs, labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside dicts / lists / tuples to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def module_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def iter_batches(inputs: Any, batch_size: int) -> Iterator[Any]:
    """Slices of at most `batch_size` samples of a tensor, a sequence (e.g. strings) or a dict of those."""
    n = batch_length(inputs)
    for start in range(0, n, batch_size):
        yield slice_batch(inputs, start, min(start + batch_size, n))


def batch_length(inputs: Any) -> int:
    """Number of samples in a tensor, a sequence or a dict of those."""
    if isinstance(inputs, Mapping):
        lengths = {batch_length(v) for v in inputs.values() if isinstance(v, (torch.Tensor, list, tuple))}
        if len(lengths) != 1:
            raise ValueError(f"Cannot tell the batch size of a dict whose entries have lengths {sorted(lengths)}.")
        return lengths.pop()
    if isinstance(inputs, (torch.Tensor, Sequence)) and not isinstance(inputs, str):
        return len(inputs)
    raise TypeError(f"Cannot split a {type(inputs).__name__} into batches; pass a tensor, a list or a dict of those.")


def slice_batch(inputs: Any, start: int, stop: int) -> Any:
    """Samples [start, stop) of a tensor, a sequence or a dict of those."""
    if isinstance(inputs, Mapping):
        return {
            k: slice_batch(v, start, stop) if isinstance(v, (torch.Tensor, list, tuple)) else v
            for k, v in inputs.items()
        }
    return inputs[start:stop]
