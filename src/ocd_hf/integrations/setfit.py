"""SetFit models: raw strings in, class logits out, cross-entropy.

A `SetFitModel` is not an nn.Module, so the adapter's `module` is a `SetFitModule`: the model's
SentenceTransformer body (the same object, not a copy) followed by its head. Layer names follow the
SetFit attributes: `model_body.0.model.encoder.layer.5.output.dense` (sentence-transformers 6), and `model_head.linear` for a
differentiable head (`use_differentiable_head=True`) or `model_head` for the default scikit-learn
LogisticRegression head. The LogisticRegression head is rebuilt as an exact nn.Linear from its
`coef_` / `intercept_` (softmax of its output = `predict_proba`; a binary head becomes the 2-class
logits [0, z], since softmax([0, z]) = [1 − σ(z), σ(z)]), so it has a loss and a weight OCD can generate.
Build the wrapper after the SetFit model is trained: the Linear is a snapshot of the fitted head.

Labels may be any of the head's classes (e.g. ratings 1-5 or strings); they are mapped to class
indices. `OCDWrapper.predict` returns what `SetFitModel.predict` would (labels if the model has them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batches import module_device
from .sentence_transformers import SentenceTransformerAdapter, body_name


class SetFitModule(nn.Module):
    """body -> (optional L2 normalisation, as SetFit's `normalize_embeddings`) -> head; features -> logits.

    Its train / eval mode is the body's: `training` reads the body's flag, and `train()` / `eval()` set
    it on the body and head as usual. (A flag of its own would start as True and, once OCD restores
    "the previous mode" after a call, switch the user's body into train mode, dropout on.)
    """

    def __init__(self, model_body: nn.Module, model_head: nn.Module, normalize_embeddings: bool = False):
        super().__init__()
        self.model_body = model_body
        self.model_head = model_head
        self.normalize_embeddings = normalize_embeddings

    @property
    def training(self) -> bool:  # type: ignore[override]
        body = self._modules.get("model_body")
        return bool(body.training) if body is not None else False

    @training.setter
    def training(self, mode: bool) -> None:
        pass  # nn.Module.train() sets the children's flags itself

    def embed(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        emb = self.model_body(dict(features))["sentence_embedding"]
        return F.normalize(emb, p=2, dim=1) if self.normalize_embeddings else emb

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model_head(self.embed(features))
        # SetFitHead returns (logits / temperature, probs) for a tensor input.
        return out[0] if isinstance(out, tuple) else out


def linear_from_logistic_regression(
    head: Any, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> nn.Linear:
    """An nn.Linear whose softmax equals `head.predict_proba` (sklearn LogisticRegression, binary or multinomial)."""
    if not hasattr(head, "coef_"):
        raise ValueError(
            "The SetFit model's LogisticRegression head is not fitted: train the SetFit model (setfit.Trainer) "
            "before wrapping it with OCD."
        )
    coef = np.asarray(head.coef_, dtype=np.float64)
    intercept = np.broadcast_to(np.asarray(head.intercept_, dtype=np.float64), (coef.shape[0],))
    n_classes = len(head.classes_)
    if n_classes == 2 and coef.shape[0] == 1:
        weight = np.concatenate([np.zeros_like(coef), coef])
        bias = np.concatenate([[0.0], intercept])
    elif coef.shape[0] == n_classes:
        if _one_vs_rest(head):
            raise ValueError(
                "This LogisticRegression head is one-vs-rest (its probabilities are normalised sigmoids, not a "
                "softmax); OCD needs a multinomial head: LogisticRegression() with the default lbfgs solver."
            )
        weight, bias = coef, intercept
    else:
        raise ValueError(f"Unexpected LogisticRegression shapes: coef_ {coef.shape} for {n_classes} classes.")
    linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        linear.bias.copy_(torch.tensor(bias))
    return linear.to(device) if device is not None else linear


def _one_vs_rest(head: Any) -> bool:
    mc = getattr(head, "multi_class", "auto")  # removed in scikit-learn 1.8: multinomial only
    if mc in ("auto", "deprecated"):
        return getattr(head, "solver", "lbfgs") == "liblinear"
    return mc == "ovr"


class SetFitAdapter(SentenceTransformerAdapter):
    family = "setfit"
    library = "setfit"

    def __init__(self, model: Any):
        body, head = model.model_body, model.model_head
        if body is None or head is None:
            raise ValueError("The SetFitModel needs both a model_body and a model_head.")
        super().__init__(model, body=body)
        if isinstance(head, nn.Module):
            linear = getattr(head, "linear", None)
            if not isinstance(linear, nn.Linear) or isinstance(linear, nn.modules.lazy.LazyModuleMixin):
                raise ValueError("The SetFit head's linear layer is not initialised: train the SetFit model first.")
            self.head_module = head
            self.preferred_layer = "model_head.linear"
            self.classes: list[Any] = list(range(linear.out_features))
            self.default_loss = None if getattr(head, "multitarget", False) else "cross_entropy"
        elif type(head).__name__ == "LogisticRegression":
            dtype = next(body.parameters()).dtype
            self.head_module = linear_from_logistic_regression(head, module_device(body), dtype)
            self.preferred_layer = "model_head"
            self.classes = [c.item() if isinstance(c, np.generic) else c for c in head.classes_]
            self.default_loss = "cross_entropy"
        else:
            raise TypeError(
                f"OCD supports SetFit models with a differentiable head (use_differentiable_head=True) or the default "
                f"scikit-learn LogisticRegression head; this one has a {type(head).__name__} "
                "(multi_target_strategy heads such as OneVsRestClassifier are not supported)."
            )
        self._module = SetFitModule(body, self.head_module, bool(getattr(model, "normalize_embeddings", False)))
        self._index = {c: i for i, c in enumerate(self.classes)}
        self._identity = self.classes == list(range(len(self.classes)))

    @property
    def module(self) -> nn.Module:
        return self._module

    # ------------------------------------------------------------------ labels
    def encode_labels(self, labels: Any) -> torch.Tensor:
        """Head classes (e.g. ratings 1-5, strings) -> class indices [B]."""
        if isinstance(labels, torch.Tensor):
            if self._identity or labels.dtype.is_floating_point:
                return labels
            values: Sequence[Any] = labels.tolist()
        elif isinstance(labels, (str, int, np.integer)):
            values = [labels]
        else:
            values = [v.item() if isinstance(v, (np.generic, torch.Tensor)) else v for v in labels]
        if self._identity and all(isinstance(v, (int, bool)) for v in values):
            return torch.as_tensor(values, dtype=torch.long)
        try:
            return torch.as_tensor([self._index[v] for v in values], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"Label {e.args[0]!r} is not one of the SetFit head's classes {self.classes}.") from None

    def decode(self, indices: torch.Tensor) -> Any:
        """Class indices -> what SetFitModel.predict returns: its labels if it has them, else the head's classes."""
        labels = getattr(self.model, "labels", None)
        preds = [self.classes[i] for i in indices.tolist()]
        if labels and all(isinstance(p, (int, np.integer)) for p in preds):
            return [labels[int(p)] for p in preds]
        if self._identity:
            return indices
        if all(isinstance(p, (int, float, np.number)) for p in preds):
            return torch.as_tensor(preds)
        return preds

    def describe(self) -> dict[str, str | None]:
        card = getattr(self.model, "model_card_data", None)
        name = getattr(card, "model_id", None) or getattr(card, "st_id", None) or body_name(self.body)
        return {"base_model": name or "SetFitModel", "base_model_library": "setfit"}
