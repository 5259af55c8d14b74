"""Eval mode for the duration of a block, restoring the module's previous mode afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Dropout off and BatchNorm on running statistics inside the block; the caller's mode comes back
    on exit, also after an error (the official OCD code leaves models in train mode while sampling)."""
    was_training = module.training
    # switching walks every submodule with setattr: skip it when nothing is in training mode (a model at
    # inference), where eval() and train(False) would change nothing
    switch = was_training or any(m.training for m in module.modules())
    if switch:
        module.eval()
    try:
        yield module
    finally:
        if switch:
            module.train(was_training)
