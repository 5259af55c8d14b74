"""Collection of overfitting targets, streamed to disk in safetensors shards.

Shard k holds samples [k·shard_size, (k+1)·shard_size) of the dataset in order. A shard is written to a
temporary file and renamed, so after a kill every shard on disk is complete: re-running the same call
skips them and recomputes only the missing ones (no sample lost or repeated). Training reads the shards
through memory maps, so the collected targets never need to fit in RAM.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from .buffers import reuse_buffers
from .conditioner import DEFAULT_NAME, Conditioner, resolve_conditioner
from .constants import COLLECTION_MANIFEST, SHARD_PATTERN
from .data_checks import check_batch, warn_ignored
from .losses import LossFn
from .manifest import check_or_write_manifest, claim_shards, collection_fingerprints
from .memory import CollectionPlan, plan_collection
from .overfit import ForwardFn, OverfitSettings, overfit_batch, probe_layer, take_range
from .shards import ShardWriter

KEYS = ("delta", "scale", "layer_input", "layer_output", "model_output", "loss_before", "index")


def collect_deltas(
    model: nn.Module,
    layer_name: str,
    dataset: Dataset,
    loss_fn: LossFn,
    output_dir: str | os.PathLike,
    settings: OverfitSettings | None = None,
    *,
    split_batch: Callable[[Any], tuple[Any, torch.Tensor]],
    forward_fn: ForwardFn,
    collate_fn: Callable | None = None,
    to_device: Callable[[Any], Any] = lambda b: b,
    batch_size: int = 64,
    shard_size: int = 4096,
    max_memory: int | str | None = None,
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    conditioner: Conditioner | None = None,
) -> DeltaStore | None:
    """Overfit `layer_name` on every sample of `dataset` and write Δ_s, ρ_s and I(x) to `output_dir`.

    Each batch is overfitted in chunks that fit `max_memory` (bytes or "8GiB"; by default a fraction of
    the memory available at the start, see `ocd_hf.memory`); the deltas do not depend on the chunking.
    With several processes (accelerate), process i writes shards k with k % num_processes == i and
    returns None; the caller waits for all processes and then opens the `DeltaStore`. `conditioner`
    makes the stored I(x) columns (`ocd_hf.conditioner`; `MeanPool` when None).

    Raises:
        CollectionMemoryError: Not even one sample fits the budget (raised before any delta is allocated).
    """
    s = settings or OverfitSettings()
    conditioner = resolve_conditioner(conditioner)
    n = len(dataset)
    if n == 0:
        raise ValueError("The dataset is empty: nothing to overfit.")
    layer = model.get_submodule(layer_name)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "layer": layer_name,
        "weight_shape": list(layer.weight.shape),
        "num_samples": n,
        "shard_size": shard_size,
        "overfit": {"steps": s.steps, "lr": s.lr, "optimizer": s.optimizer, "include_bias": s.include_bias},
        "target": s.target,
    }
    if conditioner.name != DEFAULT_NAME:  # absent for the mean, so collections made before conditioners resume
        manifest["conditioner"] = conditioner.name
    manifest["fingerprints"] = collection_fingerprints(model, layer, dataset)
    check_or_write_manifest(out / COLLECTION_MANIFEST, manifest, process_index)
    num_shards = math.ceil(n / shard_size)
    mine = [k for k in range(num_shards) if k % num_processes == process_index]
    todo = [k for k in mine if not (out / SHARD_PATTERN.format(k)).exists()]
    shard_len = lambda k: min(shard_size, n - k * shard_size)  # noqa: E731
    bar = tqdm(total=sum(map(shard_len, mine)), desc="overfitting samples", disable=not progress, unit="sample")
    bar.update(sum(map(shard_len, mine)) - sum(map(shard_len, todo)))
    plan: CollectionPlan | None = None
    ignored: list[int] = []
    keys = KEYS + (("energy",) if s.target == "factored" else ())
    # each shard is written while its lock is held, so a concurrent collector never recomputes it;
    # weight-sized tensors are reused from chunk to chunk, and a chunk is written to its shard in the
    # background while the next one is overfitted (ocd_hf.shards)
    with reuse_buffers() as buffers:
        for k in claim_shards(out, todo, SHARD_PATTERN.format):
            start, stop = k * shard_size, min((k + 1) * shard_size, n)
            writer = ShardWriter(out / SHARD_PATTERN.format(k), stop - start)
            free: list[torch.Tensor] = []  # pooled delta buffers whose chunk is on disk
            lent = None  # the pooled delta buffer of the chunk being written
            try:
                pos = 0
                for batch in _batches(dataset, start, stop, batch_size, collate_fn):
                    inputs, targets = split_batch(to_device(batch))
                    ignored += check_batch(inputs, targets, loss_fn, start + pos)
                    if plan is None:
                        probe = probe_layer(model, layer, inputs, forward_fn)
                        plan = plan_collection(
                            layer_name,
                            layer,
                            optimizer=s.optimizer,
                            target=s.target,
                            batch_size=batch_size,
                            shard_size=shard_size,
                            num_samples=n,
                            probe=probe,
                            steps=s.steps,
                            max_memory=max_memory,
                        )
                    b = targets.shape[0]
                    for c0 in range(0, b, plan.chunk_size):
                        c1 = min(c0 + plan.chunk_size, b)
                        if free and "delta" not in buffers.buffers:
                            buffers.buffers["delta"] = free.pop()
                        r = overfit_batch(
                            model,
                            layer,
                            take_range(inputs, c0, c1),
                            targets[c0:c1],
                            loss_fn,
                            forward_fn,
                            s.steps,
                            s.lr,
                            s.optimizer,
                            s.include_bias,
                            s.target,
                            method=plan.method,
                            probe=probe,
                            conditioner=conditioner,
                        )
                        chunk = {key: _stored(getattr(r, key)) for key in keys if key != "index"}
                        chunk["index"] = torch.arange(start + pos + c0, start + pos + c1)
                        pooled = buffers.buffers.get("delta")
                        writing = None
                        if pooled is not None and chunk["delta"].data_ptr() == pooled.data_ptr():
                            # the writer owns the buffer until its chunk is on disk: the next chunk
                            # takes another (the one of the chunk written before, once done)
                            writing = buffers.buffers.pop("delta")
                        writer.submit(pos + c0, chunk)  # waits for the previous chunk first
                        if lent is not None:
                            free.append(lent)
                        lent = writing
                        del r, chunk
                    pos += b
                    bar.update(b)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    bar.close()
    warn_ignored(ignored, n)
    return DeltaStore(out) if num_processes == 1 else None


# Manifest keys that differ between the folds of one cross-fitted collection.
_PER_FOLDER = ("num_samples", "fingerprints")


class DeltaStore(Dataset):
    """Memory-mapped view of a finished collection; `store[i]` is a dict of one sample's tensors.

    A list of folders (e.g. the folds of a cross-fitted collection) reads as one collection, in order;
    they must target the same layer shape with the same settings.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike]):
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        if not paths:
            raise ValueError("DeltaStore needs at least one collection folder.")
        self.path = paths[0]
        self.paths = paths
        maps, manifests = [], []
        for folder in paths:
            manifest, shard_maps = _open_collection(folder)
            if manifests and {k: v for k, v in manifest.items() if k not in _PER_FOLDER} != {
                k: v for k, v in manifests[0].items() if k not in _PER_FOLDER
            }:
                raise ValueError(
                    f"Collections {paths[0]} and {folder} were made with different settings; they cannot be read as one."
                )
            manifests.append(manifest)
            maps += shard_maps
        self.manifest = {**manifests[0], "num_samples": sum(m["num_samples"] for m in manifests)}
        self._arrays = {key: [m[key] for m in maps] for key in maps[0]}
        self._offsets = np.cumsum([0] + [len(a) for a in self._arrays["index"]])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["weight_shape"])

    @property
    def target(self) -> str:
        return self.manifest.get("target", "full")

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one stored target: the weight's, or (out, 1) for a factored collection."""
        return (
            tuple(self.manifest["weight_shape"])
            if self.target == "full"
            else (int(self._arrays["delta"][0].shape[1]), 1)
        )

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather samples by global index (one fancy-indexed read per shard)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a collection of {len(self)} samples")
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        local = idx - self._offsets[shard]
        out = {}
        for key, arrays in self._arrays.items():
            first = arrays[0]
            buf = np.empty((idx.size, *first.shape[1:]), dtype=first.dtype)
            for s in np.unique(shard):
                sel = shard == s
                buf[sel] = arrays[s][local[sel]]
            out[key] = torch.from_numpy(buf)
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.get_batch([i]).items()}

    def column(self, key: str) -> torch.Tensor:
        """One whole column (e.g. 'scale'); loads it into memory."""
        return torch.from_numpy(np.concatenate([np.asarray(a) for a in self._arrays[key]]))

    def mean(self, key: str, chunk: int = 4096) -> torch.Tensor:
        """Mean over samples of a column, computed in chunks so large deltas never load at once."""
        total, count = None, 0
        for a in self._arrays[key]:
            for s in range(0, len(a), chunk):
                part = torch.from_numpy(np.asarray(a[s : s + chunk], dtype=np.float64)).sum(0)
                total = part if total is None else total + part
            count += len(a)
        return (total / count).float()

    def std(self, key: str, chunk: int = 4096) -> torch.Tensor:
        mean = self.mean(key, chunk).double()
        total, count = None, 0
        for a in self._arrays[key]:
            for s in range(0, len(a), chunk):
                part = (torch.from_numpy(np.asarray(a[s : s + chunk], dtype=np.float64)) - mean).pow(2).sum(0)
                total = part if total is None else total + part
            count += len(a)
        return (total / max(count - 1, 1)).sqrt().float()


def _open_collection(folder: Path) -> tuple[dict, list[dict[str, np.memmap]]]:
    mpath = folder / COLLECTION_MANIFEST
    if not mpath.exists():
        raise FileNotFoundError(f"No {COLLECTION_MANIFEST} in {folder}: not a delta collection.")
    manifest = json.loads(mpath.read_text())
    n, size = manifest["num_samples"], manifest["shard_size"]
    shards = [folder / SHARD_PATTERN.format(k) for k in range(math.ceil(n / size))]
    missing = [s.name for s in shards if not s.exists()]
    if missing:
        raise FileNotFoundError(
            f"Collection in {folder} is incomplete (missing {missing[:5]}); run the collection again to resume."
        )
    maps = [_mmap_safetensors(s) for s in shards]
    held = sum(len(m["index"]) for m in maps)
    if held != n:
        raise ValueError(f"Collection in {folder} holds {held} samples, manifest says {n}.")
    return manifest, maps


_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "F16": np.float16}


def _mmap_safetensors(path: Path) -> dict[str, np.memmap]:
    """Memory-map every tensor of a safetensors file (format: u64 header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    base = 8 + hlen
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if end == start:
            out[key] = np.zeros(shape, dtype=dtype)
            continue
        out[key] = np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)
    return out


def _stored(value: torch.Tensor) -> torch.Tensor:
    """A result column as shards store it: float32 (integers as int64), on the CPU, contiguous."""
    dtype = torch.int64 if not value.is_floating_point() else torch.float32
    return value.detach().to("cpu", dtype).contiguous()


def _batches(dataset: Dataset, start: int, stop: int, batch_size: int, collate_fn: Callable | None):
    """Batches of samples [start, stop) in order: slices of a TensorDataset, else through a DataLoader."""
    if collate_fn is None and isinstance(dataset, TensorDataset):
        for s in range(start, stop, batch_size):
            yield [t[s : min(s + batch_size, stop)] for t in dataset.tensors]
        return
    yield from DataLoader(
        Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False, collate_fn=collate_fn
    )
