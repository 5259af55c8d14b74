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

With `ops=True` (per-sample overfitting uses it) the torch calls made *between* those modules before
the target layer (a functional relu or max-pool in the model's own forward, a flatten) are recorded too,
in forwards run inside `cache.replaying()`, and later passes get their recorded results instead of
computing them, so a pass after the first runs
only the target layer and what follows it. Replay is positional and checked: each call must be the
same function as at that position in the recording, else the rest of the pass is computed normally.
Recorded results are handed out without copies; if any of them (or a reused module output) has been
modified in place since it was recorded (its version counter moved), recorded results are no longer
trusted and the block computes everything again from then on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


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
        # ops=True: (function, result, versions of its tensors) of each torch call before the layer
        self.ops: list[tuple[Any, Any, list[int]]] = []
        self.ops_on = False  # recording / replaying torch calls
        self.window = False  # inside the root's forward, before the layer's first call, outside kept modules
        self.depth = 0  # nesting inside candidate modules (their own calls are theirs, not the root's)
        self.pos = 0  # replay position in `ops`
        self.watch: list[tuple[torch.Tensor, int]] = []  # tensors handed out uncopied, with their versions

    @property
    def num_reused(self) -> int:
        return len(self.outputs)

    def replaying(self) -> contextlib.AbstractContextManager:
        """Wrap each forward in this block (ops=True): torch calls are recorded / replayed only inside.

        Outside it (the loss, the optimizer) torch calls do not pay for the interception.
        """
        return _OpReplay(self) if self.ops_on else contextlib.nullcontext()


@contextlib.contextmanager
def reuse_prefix(root: nn.Module, layer: nn.Module, enabled: bool = True, ops: bool = False) -> Iterator[PrefixCache]:
    """Inside the block, the first forward of `root` records its prefix and later forwards reuse it.

    Args:
        root: The model.
        layer: The target layer; everything that finished before its first call is reused.
        enabled: False makes the block a no-op.
        ops: Also replay the torch calls between reused modules (see the module docstring).
    """
    cache = PrefixCache()
    if not enabled:
        yield cache
        return
    cache.ops_on = ops
    ancestors = {m for m in root.modules() if any(sub is layer for sub in m.modules())}
    # only the outermost finished modules (children of the layer's ancestors) are kept: their outputs
    # already hold everything below them, and keeping every submodule's output multiplies memory
    candidates = [c for a in ancestors for c in a.children() if c not in ancestors]
    patched: dict[nn.Module, Any] = {}
    handles = []

    def on_layer(mod, args):
        cache.layer_started = True
        cache.window = False

    def on_root_start(mod, args):
        cache.pos = 0
        cache.window = False  # the check below reads versions through torch: not one of the root's calls
        if cache.recorded and cache.ops_on and any(t._version != v for t, v in cache.watch):
            stop_replay()  # something edited a handed-out result in place: recompute from now on
        cache.window = cache.ops_on and cache.depth == 0

    def stop_replay() -> None:
        cache.ops_on = cache.window = False
        cache.ops.clear()
        cache.watch.clear()
        restore()
        cache.outputs.clear()

    def enter(mod, args):
        cache.depth += 1

    def make_hook(m: nn.Module):
        def hook(mod, args, out):
            try:
                if cache.recorded:
                    return None
                cache.calls[m] = cache.calls.get(m, 0) + 1
                if not cache.layer_started:
                    copied = _copy(out)  # still inside the module: this copy is not one of the root's calls
                    if copied is not _MISSING:
                        cache.outputs[m] = copied
                return None
            finally:
                cache.depth -= 1

        return hook

    def finish_recording() -> None:
        cache.recorded = True
        for m in list(cache.outputs):
            if cache.calls.get(m, 0) != 1:  # shared or re-entered modules: their output is not one value
                del cache.outputs[m]
        if cache.ops_on:
            # a recorded result edited in place after it was recorded would be handed out in its edited
            # state (and edited again): a prefix with in-place edits is not replayed, only its modules
            watch = [tv for _, _, versions in cache.ops for tv in versions]
            if any(t._version != v for t, v in watch):
                cache.ops_on = False
                cache.ops.clear()
            else:
                cache.watch = watch + [(t, t._version) for o in cache.outputs.values() for t in _tensors(o)]
        for m, out in cache.outputs.items():
            patched[m] = m.__dict__.get("forward", _MISSING)  # an instance-level forward, if the module had one
            if cache.ops_on:  # in-place edits are caught by the version check instead of a copy per pass
                m.forward = (lambda o: lambda *a, **k: o)(out)  # noqa: E731 - bind this module's output
            else:
                m.forward = (lambda o: lambda *a, **k: _copy(o))(out)  # noqa: E731 - bind this module's output

    def on_root_done(mod, args, out):
        cache.window = False
        if not cache.recorded and cache.layer_started:
            finish_recording()

    def restore() -> None:
        for m, own in patched.items():
            if own is _MISSING:
                del m.__dict__["forward"]  # back to the class's forward
            else:
                m.forward = own
        patched.clear()

    handles.append(layer.register_forward_pre_hook(on_layer))
    for m in candidates:
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(make_hook(m)))
    # root-level hooks mark a pass's start and the end of the recording pass (the root contains the layer)
    handles.append(root.register_forward_pre_hook(on_root_start))
    handles.append(root.register_forward_hook(on_root_done))
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()
        restore()


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    return []


_PLAIN = (int, float, bool, str, torch.Size, torch.dtype, torch.device, type(None))


def _alias(out: Any) -> Any:
    """`out` with its tensors detached (same storage and version counter), or _MISSING if not replayable."""
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, _PLAIN):
        return out
    if type(out) is tuple:  # lists and other containers are mutable or unusual: not replayed
        items = tuple(_alias(v) for v in out)
        return _MISSING if any(v is _MISSING for v in items) else items
    return _MISSING


class _OpReplay(TorchFunctionMode):
    """Records the torch calls of the recording pass's window and replays them in later passes."""

    def __init__(self, cache: PrefixCache) -> None:
        super().__init__()
        self.cache = cache

    def __torch_function__(self, func, types, args=(), kwargs=None):
        c = self.cache
        if not (c.window and c.depth == 0):
            return func(*args, **(kwargs or {}))
        if not c.recorded:
            out = func(*args, **(kwargs or {}))
            kept = _alias(out)
            if kept is _MISSING:  # e.g. a NumPy array: not replayed, nor anything after it
                c.window = False
                c.ops.append((None, None, []))
            else:
                c.ops.append((func, kept, [(t, t._version) for t in _tensors(kept)]))
            return out
        if c.pos < len(c.ops) and c.ops[c.pos][0] is not None and c.ops[c.pos][0] == func:
            c.pos += 1
            return c.ops[c.pos - 1][1]
        c.window = False  # a different call than recorded (or past the record): compute the rest
        return func(*args, **(kwargs or {}))
