"""`PredictMixin`: scikit-learn / SetFit-style `predict` and `predict_proba` on top of a module's forward."""

from __future__ import annotations

from typing import Any

import torch

from .integrations.batches import iter_batches


class PredictMixin:
    """Adds batched `predict_proba` / `predict` to a module with `adapter` and `forward(inputs, num_samples, generator=)`."""

    @torch.no_grad()
    def predict_proba(
        self, inputs: Any, num_samples: int = 1, batch_size: int = 32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Class probabilities with generated weights, in batches; raw strings work for SetFit / sentence-transformers."""
        single = isinstance(inputs, str)
        batches = iter_batches([inputs] if single else inputs, batch_size)
        probs = torch.cat(
            [self(self.adapter.prepare_inputs(b), num_samples, generator=generator).softmax(-1) for b in batches]
        )
        return probs[0] if single else probs

    def predict(
        self, inputs: Any, num_samples: int = 1, batch_size: int = 32, generator: torch.Generator | None = None
    ) -> Any:
        """Predicted classes (SetFit: its labels, as SetFitModel.predict returns them)."""
        single = isinstance(inputs, str)
        probs = self.predict_proba([inputs] if single else inputs, num_samples, batch_size, generator)
        preds = self.adapter.decode(probs.argmax(-1))
        return preds[0] if single else preds
