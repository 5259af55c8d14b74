"""sentence-transformers models: raw strings in, the sentence embedding is f(x).

Strings are tokenized with the model's own tokenizer and run through the model's forward (not
`encode()`, whose tensors are made in inference mode and carry no gradient). Batches are dicts
{"text": [...], "label": ...} (also "sentence"/"texts"; "labels"), rows of a Hugging Face dataset with
such columns, or (texts, labels) pairs; the DataLoader's collate tokenizes once per batch. An embedding
model has no loss of its own: pass `loss=` (a callable(embeddings, targets) -> [B]).

Candidates are the supported layers with a gradient path from the embedding, found with one probe
forward: in all-MiniLM-L6-v2 the BERT pooler (`0.model.pooler.dense`) runs but its output is
never used, so it is not a candidate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..modes import eval_mode
from .base import ModelAdapter
from .batches import LABEL_KEYS, label_key, module_device

TEXT_KEYS = ("text", "texts", "sentence", "sentences", "inputs")
PROBE_TEXT = "OCD probe: which layers have a gradient path to the output?"


class SentenceTransformerAdapter(ModelAdapter):
    family = "sentence-transformers"
    library = "sentence-transformers"

    def __init__(self, model: Any, body: nn.Module | None = None):
        # SetFit passes its SetFitModel as `model` and the SentenceTransformer as `body`.
        self.model = model
        self.body = model if body is None else body
        self._reachable: set[str] | None = None

    # ------------------------------------------------------------------ text -> features
    def tokenize(self, texts: str | Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The body's own tokenization (`preprocess` in sentence-transformers >= 6, else `tokenize`)."""
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        fn = getattr(self.body, "preprocess", None) or self.body.tokenize
        feats = fn(texts)
        return {k: v if device is None else v.to(device) for k, v in feats.items() if isinstance(v, torch.Tensor)}

    def features(self, inputs: Any) -> dict[str, torch.Tensor]:
        if isinstance(inputs, str) or (
            isinstance(inputs, Sequence) and not isinstance(inputs, Mapping) and _all_str(inputs)
        ):
            return self.tokenize(inputs, module_device(self.module))
        if isinstance(inputs, Mapping):
            return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        raise TypeError(
            f"{type(self).__name__} takes raw strings or tokenized features (a dict of tensors); got {type(inputs).__name__}."
        )

    def forward(self, module: nn.Module, inputs: Any) -> torch.Tensor:
        # sentence-transformers modules add their outputs to the features dict: pass a copy.
        return self.output_tensor(module(dict(self.features(inputs))))

    def prepare_inputs(self, inputs: Any) -> Any:
        return self.to_device(self.features(inputs), module_device(self.module))

    # ------------------------------------------------------------------ batches
    def encode_labels(self, labels: Any) -> torch.Tensor:
        if isinstance(labels, torch.Tensor):
            return labels
        if isinstance(labels, Sequence) and labels and isinstance(labels[0], torch.Tensor):
            return torch.stack(list(labels))
        return torch.as_tensor(labels)

    def split_batch(self, batch: Any) -> tuple[Any, torch.Tensor]:
        if isinstance(batch, Mapping):
            lkey = label_key(batch)
            if lkey is None:
                raise ValueError(f"A text batch needs a 'label' (or 'labels') entry; got keys {sorted(batch)}.")
            if "input_ids" in batch:
                feats = {k: v for k, v in batch.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)}
            else:
                tkey = next((k for k in TEXT_KEYS if k in batch), None)
                if tkey is None:
                    raise ValueError(
                        f"A text batch needs a 'text' entry (or one of {list(TEXT_KEYS)}); got keys {sorted(batch)}."
                    )
                feats = self.features(batch[tkey])
            return feats, self._labels_on_device(batch[lkey])
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return self.features(batch[0]), self._labels_on_device(batch[1])
        raise ValueError('Text batches must be {"text": [...], "label": ...} dicts or (texts, labels) pairs.')

    def _labels_on_device(self, labels: Any) -> torch.Tensor:
        return self.encode_labels(labels).to(module_device(self.module))

    def collate_fn(self):
        return self._collate

    def _collate(self, rows: list[Any]) -> dict[str, Any]:
        """Rows (dicts with text/label columns, (text, label) pairs or bare strings) -> tokenized batch."""
        first = rows[0]
        if isinstance(first, Mapping):
            tkey = next((k for k in TEXT_KEYS if k in first), None)
            lkey = label_key(first)
            if tkey is None:
                raise ValueError(
                    f"Dataset rows need a 'text' column (or one of {list(TEXT_KEYS)}); got columns {sorted(first)}."
                )
            texts = [row[tkey] for row in rows]
            labels = [row[lkey] for row in rows] if lkey is not None else None
        elif isinstance(first, str):
            texts, labels = list(rows), None
        elif isinstance(first, (tuple, list)) and len(first) == 2:
            texts, labels = [r[0] for r in rows], [r[1] for r in rows]
        else:
            raise ValueError(
                f"Cannot collate rows of type {type(first).__name__}; use dicts with 'text'/'label' or (text, label) pairs."
            )
        batch: dict[str, Any] = dict(self.tokenize(texts))
        if labels is not None:
            # Raw label values (numbers as a tensor): split_batch maps them, so collating twice is harmless.
            batch["label"] = (
                labels
                if any(isinstance(v, str) for v in labels)
                else torch.as_tensor(
                    np.asarray([v.cpu().numpy() if isinstance(v, torch.Tensor) else v for v in labels])
                )
            )
        return batch

    # ------------------------------------------------------------------ layers
    def candidate_layers(self) -> dict[str, nn.Module]:
        layers = super().candidate_layers()
        if self._reachable is None:
            self._reachable = self._layers_reaching_output(layers)
        return {n: m for n, m in layers.items() if n in self._reachable}

    def _layers_reaching_output(self, layers: dict[str, nn.Module]) -> set[str]:
        """Names of the layers whose weight gets a gradient from f(x) on a probe sentence."""
        if not layers:
            return set()
        module = self.module
        weights = [m.weight for m in layers.values()]
        flags = [w.requires_grad for w in weights]
        with eval_mode(module):
            try:
                for w in weights:
                    w.requires_grad_(True)
                with torch.inference_mode(False), torch.enable_grad():
                    out = self.forward(module, [PROBE_TEXT])
                    grads = torch.autograd.grad(out.float().sum(), weights, allow_unused=True)
            finally:
                for w, f in zip(weights, flags):
                    w.requires_grad_(f)
        return {n for n, g in zip(layers, grads) if g is not None}

    def describe(self) -> dict[str, str | None]:
        return {"base_model": body_name(self.body) or type(self.model).__name__, "base_model_library": self.library}


def body_name(body: nn.Module) -> str | None:
    """Hub id (or folder) of a SentenceTransformer: its card's base model, else its transformer's name_or_path."""
    card = getattr(body, "model_card_data", None)
    name = getattr(card, "base_model", None)
    if name:
        return name
    for m in body.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_name_or_path", None):
            return cfg._name_or_path
    return None


def _all_str(seq: Sequence[Any]) -> bool:
    return len(seq) > 0 and all(isinstance(s, str) for s in seq)
