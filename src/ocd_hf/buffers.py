"""Buffer reuse while overfitting: weight-sized tensors kept from one chunk to the next.

On CPU a freshly allocated large tensor costs page faults on first touch, and per-sample overfitting
of a small layer allocates several [B, out, in] tensors per step (delta, Adam's moments, gradients,
temporaries); those faults, not the arithmetic, dominate its time. Inside `reuse_buffers`,
`overfit_batch` and the per-sample forward take these tensors from one pool instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class BufferPool:
    """Weight-sized tensors kept from one overfitting chunk to the next (see `reuse_buffers`)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor | None] = {}
        self.spare: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A buffer the pool gives away (it holds no reference until `give` returns it), uninitialised."""
        buf = self.spare.pop(name, None)
        if buf is None or not _fits(buf, shape, dtype, device):
            buf = None  # dropped before the new one is made: one buffer per name at any time
            buf = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def give(self, name: str, buf: torch.Tensor) -> None:
        """Return a buffer handed out by `take` (e.g. a gradient after the optimizer step)."""
        self.spare[name] = buf.detach()

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The pool's buffer `name`, uninitialised when new (a smaller last chunk replaces it); never requires grad."""
        buf = self.buffers.get(name)
        if buf is None or not _fits(buf, shape, dtype, device):
            buf = self.buffers[name] = None  # the old one goes before the new one is made
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        buf.grad = None
        return buf.requires_grad_(False)


def _fits(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    return tuple(buf.shape) == tuple(shape) and buf.dtype == dtype and buf.device == torch.device(device)


_POOL: list[BufferPool] = []


@contextlib.contextmanager
def reuse_buffers() -> Iterator[BufferPool]:
    """Within the block, `overfit_batch` takes its delta, Adam moments, gradients and temporaries from one pool.

    The price: a result's full delta shares memory with the next call's, so the caller copies it out
    first (`collect_deltas` does). The pool is freed on exit.
    """
    pool = BufferPool()
    _POOL.append(pool)
    try:
        yield pool
    finally:
        _POOL.remove(pool)
        pool.buffers.clear()
        pool.spare.clear()


def current_pool() -> BufferPool | None:
    """The innermost `reuse_buffers` pool, or None outside one."""
    return _POOL[-1] if _POOL else None
