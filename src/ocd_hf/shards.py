"""Shard writing during collection: a safetensors file filled chunk by chunk, in a background thread.

A shard's layout (every column's shape and dtype, hence every byte offset) is fixed once the first
chunk is known, so each chunk is written straight to its place in the file with `os.pwrite`: the
shard is never assembled in memory, and the write of one chunk overlaps the overfitting of the next.
The file is a plain safetensors file (JSON header, then the columns back to back), written under a
temporary name and renamed when complete, so a kill leaves no half-written shard.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

_NAMES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.float16: "F16"}


class ShardWriter:
    """One shard of `rows` samples; columns are written by row ranges (`submit`), then `close` renames it.

    At most one chunk is being written while the caller computes the next: `submit` first waits for
    the previous chunk, so a buffer handed to the writer is free again once the next `submit` returns.

    Args:
        path: The shard's final path.
        rows: Samples in the shard.
    """

    def __init__(self, path: Path, rows: int) -> None:
        self.path = Path(path)
        self.rows = rows
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.fd: int | None = None
        self.columns: dict[str, tuple[int, int]] = {}  # key -> (file offset of its first row, bytes per row)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocd-shard-writer")
        self.pending: Future | None = None

    def _open(self, first: dict[str, torch.Tensor]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset, rows = 0, {}
        for key, t in first.items():
            if t.dtype not in _NAMES:
                raise TypeError(f"Column {key!r} has dtype {t.dtype}, which shards do not store.")
            row_bytes = t[0].numel() * t.element_size() if t.shape[0] else 0
            header[key] = {
                "dtype": _NAMES[t.dtype],
                "shape": [self.rows, *t.shape[1:]],
                "data_offsets": [offset, offset + self.rows * row_bytes],
            }
            rows[key] = (offset, row_bytes)
            offset += self.rows * row_bytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes so the data is aligned
        base = 8 + len(raw)
        self.columns = {key: (base + off, row_bytes) for key, (off, row_bytes) in rows.items()}
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, base + offset)

    def submit(self, row: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` (CPU, contiguous, the batch first) at rows [row, row + len) of their columns."""
        self.wait()
        if self.fd is None:
            self._open(tensors)
        missing = set(self.columns) ^ set(tensors)
        if missing:
            raise KeyError(f"Chunk columns {sorted(tensors)} differ from the shard's {sorted(self.columns)}.")
        self.pending = self.pool.submit(self._write, row, tensors)

    def _write(self, row: int, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            start, row_bytes = self.columns[key]
            data = memoryview(t.numpy()).cast("B")
            if len(data) != t.shape[0] * row_bytes:
                raise ValueError(
                    f"Column {key!r}: a chunk row has {len(data) // max(t.shape[0], 1)} bytes, not {row_bytes}."
                )
            done = 0
            while done < len(data):  # pwrite may write less than asked
                done += os.pwrite(self.fd, data[done:], start + row * row_bytes + done)

    def wait(self) -> None:
        """Block until the chunk being written is on disk (re-raises its error)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        """Finish the last chunk and rename the shard to its final name."""
        try:
            self.wait()
            if self.fd is None:
                raise RuntimeError(f"Shard {self.path.name} got no rows.")
            os.close(self.fd)
            self.fd = None
            os.replace(self.tmp, self.path)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop and remove the temporary file (a no-op after `close`)."""
        try:
            if self.pending is not None:
                self.pending.exception()  # let a running write end before its file goes
                self.pending = None
        finally:
            self.pool.shutdown(wait=True)
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self.tmp.unlink(missing_ok=True)
