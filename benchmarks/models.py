"""The base models of the benchmarks and their training loop.

LeNet5 and the MLP are the architectures of examples/lenet5_fashion_mnist.py and examples/tabular_ocd.py
(the paper's MNIST LeNet5 and CA-housing MLP settings); the digits LeNet is `ocd_hf.demo.LeNetDigits`.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .data import tensors_of

MISSING_CLASS_LOGIT_GAP = 10.0  # see complete_classes


class LeNet5(nn.Module):
    """LeCun et al. 1998 on 28x28 inputs (conv1 pads by 2, as for the 32x32 original): 400 -> 120 -> 84 -> 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class MLP(nn.Module):
    """Three Linear layers with ReLUs: d_in -> hidden -> hidden -> 1 (regression)."""

    def __init__(self, d_in: int = 8, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@contextlib.contextmanager
def preserved_rng():
    """Run a block that seeds the global RNGs (torch CPU, numpy, random) and put their states back after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def fit_torch(
    model: nn.Module, ds: Dataset, loss_fn: Any, *, epochs: int, batch_size: int, lr: float, seed: int
) -> nn.Module:
    """The examples' loop: Adam, `epochs` passes over seeded random batches; returns the model in eval mode.

    Args:
        model: the model to train in place.
        ds: a TensorDataset (or a Subset of one) of (inputs, targets).
        loss_fn: (outputs, targets) -> scalar loss.
        epochs: passes over `ds`.
        batch_size: samples per step.
        lr: Adam's learning rate.
        seed: seeds the batch order.
    """
    xs, ys = tensors_of(ds)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ys), generator=g).split(batch_size):
            opt.zero_grad()
            loss_fn(model(xs[idx]), ys[idx]).backward()
            opt.step()
    return model.eval()


def complete_classes(head: Any, n_classes: int) -> None:
    """Give a LogisticRegression head fitted on a subset that lacks some classes a row for each missing class.

    K-fold cross-fitting trains on subsets of a few-shot set, which can miss a class (quick runs: 2 shots).
    The adapter needs the same n_classes x d head as the full model. A class with no examples gets a zero
    weight row and an intercept MISSING_CLASS_LOGIT_GAP below the lowest fitted one: the finite stand-in
    for the unregularised intercept's limit (-inf) in a multinomial fit.

    Args:
        head: a fitted scikit-learn LogisticRegression (changed in place).
        n_classes: the number of classes of the full task (labels 0..n_classes-1).
    """
    classes = np.asarray(head.classes_)
    if len(classes) == n_classes:
        return
    coef = np.asarray(head.coef_, dtype=np.float64)
    intercept = np.asarray(head.intercept_, dtype=np.float64)
    if len(classes) == 1:
        raise ValueError("A SetFit training subset with a single class cannot be cross-fitted.")
    if len(classes) == 2 and coef.shape[0] == 1:  # binary: logits [0, z]
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    new_coef = np.zeros((n_classes, coef.shape[1]))
    new_intercept = np.full(n_classes, intercept.min() - MISSING_CLASS_LOGIT_GAP)
    new_coef[classes] = coef
    new_intercept[classes] = intercept
    head.coef_, head.intercept_, head.classes_ = new_coef, new_intercept, np.arange(n_classes)
    warnings.warn(
        f"SetFit train_fn: classes {sorted(set(range(n_classes)) - set(classes.tolist()))} had no training "
        "examples in this subset; their head rows are zero with a low intercept.",
        stacklevel=3,
    )
