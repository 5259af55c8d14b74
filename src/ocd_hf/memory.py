"""Memory budget of collection: how many samples one overfitting chunk may hold.

Per-sample overfitting keeps per-sample copies of the target layer's weight: the delta, its gradient
and, with Adam, two moment buffers. On a 4096x4096 layer that is 256 MiB per sample, so a batch of 64
does not fit a typical machine. `plan_collection` estimates the bytes one sample needs from the layer's
shape, the optimizer, the target and the method `overfit_batch` will use, and splits each collection
batch into chunks that fit a budget (by default `DEFAULT_FRACTION` of the memory available when the
collection starts). A request that cannot fit even one sample is refused before anything is allocated.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from .capture import is_channels_first
from .per_sample import out_features

DEFAULT_FRACTION = 0.5
# working copies per sample of a weight-shaped tensor: delta, gradient, (exp_avg, exp_avg_sq), one temporary
FULL_COPIES = {"adam": 5, "sgd": 3}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


class CollectionMemoryError(MemoryError):
    """Collection would need more memory than the budget allows, even for a single sample."""


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes from an int, or a string such as "8GiB", "500MB" (None stays None).

    Args:
        value: Bytes, or a number with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; case-insensitive).
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_memory={value!r} must be positive.")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"max_memory={value!r} is not a memory size; use bytes (int) or e.g. '8GiB', '500MB'.")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that can still be allocated: free GPU memory on CUDA, MemAvailable (or psutil) on the host."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks this process's caching allocator holds but does not use are free for our tensors too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages > 0 else 8 * 2**30


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class LayerProbe:
    """What one sample's unmodified forward shows about the target layer (see `probe_layer`)."""

    input_shape: tuple[int, ...]  # the layer's input for one sample, batch dim excluded
    output_numel: int
    model_output_numel: int
    calls: int  # forwards of the layer per model forward (weight sharing runs it more than once)

    @property
    def one_vector(self) -> bool:
        """The layer sees one input vector per sample ([B, in], no token dims) in a single call."""
        return self.calls == 1 and len(self.input_shape) == 1


@dataclass(frozen=True)
class CollectionPlan:
    """How a collection batch is split: `chunk_size` samples are overfitted together.

    Args:
        chunk_size: Samples per overfitting chunk (<= the collection batch size).
        method: The per-sample method `overfit_batch` uses ("full", "factored-sgd", "rank-one-adam").
        sample_bytes: Estimated working memory of one sample.
        stored_bytes: Bytes one sample adds to its shard.
        budget_bytes: The budget the chunks were sized for.
    """

    chunk_size: int
    method: str
    sample_bytes: int
    stored_bytes: int
    budget_bytes: int


def overfit_method(layer: nn.Module, optimizer: str, target: str, probe: LayerProbe | None) -> str:
    """Which of `overfit_batch`'s methods applies: "full", "factored-sgd" or "rank-one-adam".

    "rank-one-adam" needs one input vector per sample (then every Adam step on the full delta is rank one);
    a factored Adam collection on token inputs optimises the full delta and projects it ("full").
    """
    if target == "factored" and optimizer == "sgd":
        return "factored-sgd"
    if target == "factored" and optimizer == "adam" and probe is not None and probe.one_vector:
        return "rank-one-adam"
    return "full"


def sample_bytes(layer: nn.Module, optimizer: str, method: str, probe: LayerProbe | None, steps: int = 3) -> int:
    """Estimated working memory of one sample during `overfit_batch` (delta side and the layer's activations)."""
    w = layer.weight
    size = w.element_size()
    if method == "full":
        delta_side = FULL_COPIES.get(optimizer, 5) * w.numel()
    else:  # u, its gradient, Adam's two moments, temporaries: all [out]
        delta_side = 8 * out_features(layer)
    acts = 0
    if probe is not None:  # the layer's input and output kept by autograd for every step
        acts = (steps + 1) * (math.prod(probe.input_shape) + probe.output_numel)
    return int((delta_side + acts) * size)


def stored_bytes(layer: nn.Module, target: str, probe: LayerProbe | None) -> int:
    """Float32 bytes one sample adds to its shard (target, conditioning, scalars)."""
    size = layer.weight.numel() if target == "full" else out_features(layer)
    pooled_in = 0 if probe is None else probe.input_shape[0 if is_channels_first(layer) else -1]
    cond = 0 if probe is None else pooled_in + probe.output_numel + probe.model_output_numel
    return 4 * (size + cond + 8)


def plan_collection(
    layer_name: str,
    layer: nn.Module,
    *,
    optimizer: str,
    target: str,
    batch_size: int,
    shard_size: int,
    num_samples: int | None = None,
    probe: LayerProbe | None = None,
    steps: int = 3,
    max_memory: int | str | None = None,
    device: torch.device | str | None = None,
) -> CollectionPlan:
    """Chunk size for overfitting `layer` so that one chunk plus one shard's stored bytes fit the budget.

    Args:
        layer_name: Named in the error message.
        layer: The target layer.
        optimizer: "adam" or "sgd".
        target: "full" or "factored".
        batch_size: The collection batch size (the chunk never exceeds it).
        shard_size: Samples per shard. The plan reserves a whole shard's stored bytes, an upper bound: the
            shard writer (`ocd_hf.shards`) streams each chunk to disk and holds at most the chunk in flight.
        num_samples: Samples in the collection (a smaller collection holds one shorter shard).
        probe: One sample's forward (`probe_layer`), for the method and the activation sizes.
        steps: Overfitting steps.
        max_memory: Budget in bytes or as "8GiB"; `DEFAULT_FRACTION` of the available memory when None.
        device: Where the overfitting runs (CUDA: the budget is GPU memory; the shard lives on the host).

    Raises:
        CollectionMemoryError: Not even one sample fits; names the layer, the estimate and the options.
    """
    device = torch.device(device or layer.weight.device)
    method = overfit_method(layer, optimizer, target, probe)
    per = sample_bytes(layer, optimizer, method, probe, steps)
    stored = stored_bytes(layer, target, probe)
    given = parse_memory(max_memory)
    budget = given if given is not None else int(DEFAULT_FRACTION * available_memory(device))
    shard = shard_size if num_samples is None else min(shard_size, num_samples)
    shard_bytes = stored * shard
    if device.type == "cuda":
        host = given if given is not None else int(DEFAULT_FRACTION * available_memory("cpu"))
        room, host_short = budget, shard_bytes > host
    else:
        room, host_short = budget - shard_bytes, False
    if host_short or room < per:
        raise CollectionMemoryError(_refusal(layer_name, layer, optimizer, target, per, shard_bytes, shard, budget))
    return CollectionPlan(
        chunk_size=max(1, min(batch_size, room // per)),
        method=method,
        sample_bytes=per,
        stored_bytes=stored,
        budget_bytes=budget,
    )


def _refusal(
    layer_name: str, layer: nn.Module, optimizer: str, target: str, per: int, shard_bytes: int, shard: int, budget: int
) -> str:
    shape = tuple(layer.weight.shape)
    options = []
    if target == "full":
        options.append(
            'target="factored" (the head generates one vector per sample; with Adam on 2-D inputs the '
            "collection needs kilobytes per sample)"
        )
    if optimizer == "adam":
        options.append('overfit_optimizer="sgd" (no moment buffers; with target="factored" no weight-sized tensor)')
    options.append(f"a smaller shard_size (now {shard}; the shard in assembly needs {fmt_bytes(shard_bytes)})")
    options.append("a larger max_memory, if the machine has the memory")
    return (
        f"Collecting deltas for layer {layer_name!r} (weight {shape}, target={target!r}, optimizer={optimizer!r}) "
        f"needs about {fmt_bytes(per)} per sample plus {fmt_bytes(shard_bytes)} for shards of {shard} samples, "
        f"but the memory budget is {fmt_bytes(budget)}. Options: " + "; ".join(options) + "."
    )
