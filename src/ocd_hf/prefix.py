"""Prefix reuse: the layers that run before the target layer give the same outputs for every weight delta.

OCD runs the model several times on one batch: the plain pass that captures I(x), then one pass per
weight draw (and, while collecting, one per overfitting step). Only the target layer and what comes
after it change between those passes. `reuse_prefix` records, during the first pass, the output of
every module that finished before the target layer was first called (and does not contain it); later
passes inside the same block return those outputs instead of recomputing them. For a SetFit head
the whole sentence encoder is skipped; for a LeNet fc2 the conv stack and fc1.

Only the outermost such modules are kept (the children of the layer's ancestors), and only when they
ran exactly once and returned tensors (or tuples, lists, dicts of them); anything else runs again. Recorded
outputs are copied, and every reuse hands out a fresh copy, so in-place edits by the caller (x.relu_())
cannot leak between passes. The block must run the *same inputs* through the *same weights* each time
(everything but the target layer's delta).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


class _Missing:
    pass


_MISSING = _Missing()


def _copy(out: Any) -> Any:
    """A detached copy of a module output made of tensors (tuples, lists, dicts of them), else _MISSING."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if out is None or isinstance(out, (int, float, bool, str)):
        return out
    if isinstance(out, (tuple, list)):
        items = [_copy(v) for v in out]
        return _MISSING if any(v is _MISSING for v in items) else type(out)(items)
    if isinstance(out, Mapping):
        items = {k: _copy(v) for k, v in out.items()}
        if any(v is _MISSING for v in items.values()):
            return _MISSING
        try:  # dict, OrderedDict, transformers' ModelOutput
            return type(out)(**items) if type(out) is not dict else items
        except TypeError:
            return _MISSING
    return _MISSING


class PrefixCache:
    """What `reuse_prefix` recorded: module -> output, and whether the recording pass has finished."""

    def __init__(self) -> None:
        self.outputs: dict[nn.Module, Any] = {}
        self.calls: dict[nn.Module, int] = {}
        self.recorded = False
        self.layer_started = False

    @property
    def num_reused(self) -> int:
        return len(self.outputs)


@contextlib.contextmanager
def reuse_prefix(root: nn.Module, layer: nn.Module, enabled: bool = True) -> Iterator[PrefixCache]:
    """Inside the block, the first forward of `root` records its prefix and later forwards reuse it."""
    cache = PrefixCache()
    if not enabled:
        yield cache
        return
    ancestors = {m for m in root.modules() if any(sub is layer for sub in m.modules())}
    # only the outermost finished modules (children of the layer's ancestors) are kept: their outputs
    # already hold everything below them, and keeping every submodule's output multiplies memory
    candidates = [c for a in ancestors for c in a.children() if c not in ancestors]
    patched: dict[nn.Module, Any] = {}
    handles = []

    def on_layer(mod, args):
        cache.layer_started = True

    def make_hook(m: nn.Module):
        def hook(mod, args, out):
            if cache.recorded:
                return None
            cache.calls[m] = cache.calls.get(m, 0) + 1
            if not cache.layer_started:
                copied = _copy(out)
                if copied is not _MISSING:
                    cache.outputs[m] = copied
            return None

        return hook

    def finish_recording() -> None:
        cache.recorded = True
        for m in list(cache.outputs):
            if cache.calls.get(m, 0) != 1:  # shared or re-entered modules: their output is not one value
                del cache.outputs[m]
        for m, out in cache.outputs.items():
            patched[m] = m.__dict__.get("forward", _MISSING)  # an instance-level forward, if the module had one
            m.forward = (lambda o: lambda *a, **k: _copy(o))(out)  # noqa: E731 - bind this module's output

    def on_root_done(mod, args, out):
        if not cache.recorded and cache.layer_started:
            finish_recording()

    handles.append(layer.register_forward_pre_hook(on_layer))
    for m in candidates:
        handles.append(m.register_forward_hook(make_hook(m)))
    # a root-level hook marks the end of the recording pass (the root contains the layer, so it is an ancestor)
    handles.append(root.register_forward_hook(on_root_done))
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()
        for m, own in patched.items():
            if own is _MISSING:
                del m.__dict__["forward"]  # back to the class's forward
            else:
                m.forward = own
