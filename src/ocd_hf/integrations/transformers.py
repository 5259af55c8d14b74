"""transformers models: dict inputs, `labels` give the loss, `logits` is f(x).

Sequence / image / audio classification heads get a default loss (cross-entropy, or mse for
`problem_type="regression"` / `num_labels == 1`); every Linear and `Conv1D` inside (encoder layers
included) is a candidate. Tokenized Hugging Face `datasets` work as training data: rows are collated
with `data_collator` (e.g. `DataCollatorWithPadding(tokenizer)`), or with the tokenizer's padding, or
else padded here with the model's `pad_token_id`; columns that are not numbers (e.g. "text") are
dropped and "label" becomes "labels". With a tokenizer, rows of raw text ("text", "sentence" or
"content" column, no input_ids) are tokenized per batch.

With a tokenizer (`OCDWrapper.from_pretrained(model, layer=..., tokenizer=tok)`) the wrapper and `predict`
take raw strings; a collator: `OCDWrapper.from_pretrained(TransformersAdapter(model, data_collator=c), layer=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

from .batches import LABEL_KEYS, label_key, module_device, split_dict_batch
from .torch import TorchAdapter

# Columns that hold raw text, tokenized with the adapter's tokenizer when a batch has no input_ids.
TEXT_KEYS = ("text", "sentence", "content")
CLASSIFICATION_SUFFIXES = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForAudioClassification",
    "ForVideoClassification",
    "ForImageClassificationWithTeacher",
)


class TransformersAdapter(TorchAdapter):
    family = "transformers"

    def __init__(self, model: nn.Module, tokenizer: Any = None, data_collator: Callable | None = None):
        super().__init__(model)
        self.tokenizer = tokenizer
        self.data_collator = data_collator
        self.default_loss = default_loss_for(model)
        self.preferred_layer = classifier_layer(model)

    # ------------------------------------------------------------------ batches
    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            missing = "A batch for a transformers model needs a 'labels' (or 'label') entry"
            return split_dict_batch(batch, missing, tensors_only=True)
        return super().split_batch(batch)

    def collate_fn(self):
        return self._collate

    # ------------------------------------------------------------------ raw strings
    def prepare_inputs(self, inputs: Any) -> Any:
        return super().prepare_inputs(self.encode(inputs))

    def forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        if _is_text(inputs):
            inputs = self.to_device(self.encode(inputs), module_device(module))
        return super().forward(module, inputs)

    def encode(self, inputs: Any) -> Any:
        """Raw strings (one or a list) -> the tokenizer's padded tensors; anything else as it is."""
        if not _is_text(inputs):
            return inputs
        if self.tokenizer is None:
            raise ValueError(
                "Raw strings need a tokenizer: OCDWrapper.from_pretrained(model, layer=..., "
                "tokenizer=AutoTokenizer.from_pretrained(<the model's id or folder>))."
            )
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        return dict(self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))

    def _collate(self, rows: list[Any]) -> Any:
        if not rows or not isinstance(rows[0], Mapping):
            return default_collate(rows)
        text = next((k for k in TEXT_KEYS if isinstance(rows[0].get(k), str)), None)
        if text is not None and "input_ids" not in rows[0] and self.tokenizer is not None:
            # raw text rows (e.g. a datasets.Dataset with "text" and "label"): tokenized per batch
            batch = self.encode([row[text] for row in rows])
            key = label_key(rows[0])
            if key is not None:
                batch["labels"] = _tensor(np.asarray([_as_array(row[key]) for row in rows]))
            return batch
        rows = [{("labels" if k in LABEL_KEYS else k): v for k, v in row.items() if _numeric(v)} for row in rows]
        if self.data_collator is not None:
            return self.data_collator(rows)
        if self.tokenizer is not None and hasattr(self.tokenizer, "pad"):
            labels = [row.pop("labels") for row in rows] if "labels" in rows[0] else None
            batch = dict(self.tokenizer.pad(rows, return_tensors="pt"))
            if labels is not None:
                batch["labels"] = _tensor(np.asarray([_as_array(v) for v in labels]))
            return batch
        return pad_rows(rows, pad_token_id(self.model))

    # ------------------------------------------------------------------ provenance
    def describe(self) -> dict[str, str | None]:
        cfg = getattr(self.model, "config", None)
        return {
            "base_model": getattr(cfg, "_name_or_path", None) or type(self.model).__name__,
            "base_model_library": "transformers",
        }


def _is_text(inputs: Any) -> bool:
    return isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(t, str) for t in inputs)
    )


def default_loss_for(model: nn.Module) -> str | None:
    """cross_entropy / mse for classification heads (per config.problem_type and num_labels), else None."""
    name = type(model).__name__
    if not name.endswith(CLASSIFICATION_SUFFIXES):
        return None
    cfg = model.config
    problem = getattr(cfg, "problem_type", None)
    if problem == "regression" or (problem is None and getattr(cfg, "num_labels", 2) == 1):
        return "mse"
    if problem == "multi_label_classification":
        return None  # needs a per-sample BCE; pass loss=callable
    return "cross_entropy"


def classifier_layer(model: nn.Module) -> str | None:
    """Name of the last Linear of the classification head (`classifier`, `score`), if there is one."""
    for attr in ("classifier", "score"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears:
                return next(n for n, m in model.named_modules() if m is linears[-1])
    return None


def pad_token_id(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(cfg, "text_config", None), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _numeric(v: Any) -> bool:
    """Numbers, tensors, numeric arrays and (nested) lists of numbers; strings, images and None are not."""
    if isinstance(v, (bool, int, float, np.number)):
        return True
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, np.ndarray):
        return v.dtype.kind in "biuf"
    if isinstance(v, (list, tuple)):
        return len(v) > 0 and all(_numeric(x) for x in v[:8])
    return False


def _as_array(v: Any) -> np.ndarray:
    return v.cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """float64 (Python floats) becomes float32, like torch.tensor would make it."""
    return torch.as_tensor(a.astype(np.float32) if a.dtype == np.float64 else a)


def pad_rows(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack each key; sequences of different lengths are right-padded (input_ids with `pad_id`, the rest with 0).

    When padding happens and the rows carry no attention_mask, one is added.
    """
    out: dict[str, torch.Tensor] = {}
    padded = False
    for key in rows[0]:
        arrays = [_as_array(row[key]) for row in rows]
        shapes = {a.shape for a in arrays}
        if len(shapes) == 1:
            out[key] = _tensor(np.stack(arrays))
            continue
        if len({a.shape[1:] for a in arrays}) != 1:
            raise ValueError(
                f"Cannot pad column {key!r}: its rows differ beyond the first dimension ({sorted(shapes)})."
            )
        length = max(a.shape[0] for a in arrays)
        fill = pad_id if key == "input_ids" else 0
        buf = np.full((len(arrays), length, *arrays[0].shape[1:]), fill, dtype=arrays[0].dtype)
        for i, a in enumerate(arrays):
            buf[i, : a.shape[0]] = a
        out[key] = torch.as_tensor(buf)
        padded = True
    if padded and "attention_mask" not in out and "input_ids" in out:
        lengths = [len(_as_array(row["input_ids"])) for row in rows]
        mask = torch.zeros(out["input_ids"].shape[:2], dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        out["attention_mask"] = mask
    return out
