"""The manifest of a delta collection and the locks that let several processes share its folder.

`collection.json` records the collection's settings and fingerprints of what the deltas depend on: the
base weights (the target layer, and the whole model when hashing it is cheap) and the data (its size and
a hash of evenly spaced rows). A rerun into the same folder resumes only when all of them match;
otherwise it is refused, naming what differs. Writers serialise on file locks: one on the folder while
the manifest is checked or created, one per shard while it is computed, so two collectors sharing a
folder split the shards between them instead of both computing (or overwriting) every one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .layers import layer_fingerprint

try:  # POSIX only; elsewhere collection folders are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_NAME = ".lock"
# A whole-model fingerprint is taken up to this size, where it costs well under a second (docs/sharing.md).
MODEL_HASH_MAX_BYTES = 256 * 2**20
SAMPLE_ROWS = 64


# ---------------------------------------------------------------------------------------------- fingerprints
def model_fingerprint(module: nn.Module, max_bytes: int | None = MODEL_HASH_MAX_BYTES) -> str | None:
    """sha256 over every parameter and buffer (name, dtype, shape, raw bytes); None when the model holds
    more than `max_bytes` (None: no limit)."""
    state = module.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    if max_bytes is not None and size > max_bytes:
        return None
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(dataset: Any, rows: int = SAMPLE_ROWS) -> dict[str, Any]:
    """Size of `dataset` and a sha256 of up to `rows` evenly spaced rows (inputs and labels)."""
    n = len(dataset)
    idx = sorted({int(i) for i in np.linspace(0, n - 1, num=min(rows, n))}) if n else []
    h = hashlib.sha256()
    for i in idx:
        h.update(f"#{i}:".encode())
        _hash_value(h, dataset[i])
    return {"num_samples": n, "sample_rows": len(idx), "sample_sha256": h.hexdigest()}


def _hash_value(h: Any, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        h.update(f"T{v.dtype}{tuple(v.shape)}".encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(v, dict):
        for k in sorted(v, key=str):
            h.update(f"K{k!s}".encode())
            _hash_value(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(f"L{len(v)}".encode())
        for x in v:
            _hash_value(h, x)
    elif isinstance(v, (str, bytes, int, float, bool)) or v is None:
        h.update(f"V{type(v).__name__}:{v!r}".encode())
    elif hasattr(v, "__array__") or hasattr(v, "__array_interface__"):  # numpy arrays, PIL images
        a = np.asarray(v)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    else:  # an object without a stable byte form: its type is all that can be compared
        h.update(f"O{type(v).__qualname__}".encode())


def collection_fingerprints(model: nn.Module, layer: nn.Module, dataset: Any) -> dict[str, Any]:
    """What the collected deltas depend on besides the settings: base weights and data."""
    return {
        "layer_sha256": layer_fingerprint(layer.weight),
        "model_sha256": model_fingerprint(model),
        "data": data_fingerprint(dataset),
    }


# ---------------------------------------------------------------------------------------------- manifest
def check_or_write_manifest(path: Path, manifest: dict[str, Any], process_index: int = 0) -> None:
    """Refuse a folder whose manifest differs from `manifest` (naming the differing keys); write it when
    absent (process 0). Runs under the folder's lock, so two new collectors cannot both write one."""
    with folder_lock(path.parent):
        if path.exists():
            old = read_manifest(path)
            diff = manifest_diff(old, manifest)
            if diff:
                shown = "; ".join(f"{k}: {a!r} in the folder, {b!r} now" for k, a, b in diff[:6])
                raise ValueError(
                    f"{path.parent} already holds a collection made with other settings, base weights or data "
                    f"({shown}). Its deltas do not fit this run: use a new directory or delete it to start over."
                )
            if "fingerprints" not in old:
                warnings.warn(
                    f"{path} predates base-weight and data fingerprints: reusing its deltas without checking that "
                    "the model and the data are unchanged.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        elif process_index == 0:
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(manifest, indent=2))
            os.replace(tmp, path)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); delete the folder to collect again.") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a JSON object; delete the folder to collect again.")
    return d


def manifest_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every difference; fingerprints an old manifest lacks are skipped."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = prefix + k
        if k not in old and key.startswith("fingerprints"):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += manifest_diff(a, b, key + ".")
        elif a != b and not (key.endswith("model_sha256") and None in (a, b)):
            out.append((key, a, b))
    return out


# ---------------------------------------------------------------------------------------------- locks
@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on `folder/.lock` for a short critical section (waits for other holders)."""
    with _locked(folder / LOCK_NAME, blocking=True):
        yield


@contextlib.contextmanager
def _locked(path: Path, *, blocking: bool) -> Iterator[bool]:
    """Yields whether the lock on `path` was taken (always True when blocking or without fcntl)."""
    if fcntl is None:
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def claim_shards(folder: Path, todo: Sequence[int], shard_name: Any) -> Iterator[int]:
    """Yield the shards of `todo` this process should compute, each while holding its lock.

    A shard locked by another collector is skipped at first and waited for at the end; it is yielded
    then only if that collector died before writing it. A shard that appeared meanwhile is skipped.
    """
    later = []
    for k in todo:
        with _locked(folder / f".{shard_name(k)}.lock", blocking=False) as mine:
            if not mine:
                later.append(k)
                continue
            if not (folder / shard_name(k)).exists():
                yield k
    for k in later:
        with _locked(folder / f".{shard_name(k)}.lock", blocking=True):
            if not (folder / shard_name(k)).exists():
                yield k
