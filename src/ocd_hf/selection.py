"""`layer="auto"`: pick the layer by the entropy of the loss under perturbation (paper Eq. 6).

For every candidate layer L and a fixed set of N samples: draw K Gaussian perturbations of L's weight
only, ε_k ~ N(0, (σ·std(W_L))²), record the per-sample losses ℓ_n(W_L + ε_k), fit a 1-D Gaussian KDE
(Silverman bandwidth) to the K losses of each sample, take its differential entropy and sum over the
samples. The layer with the largest sum wins: it is the layer whose weight changes move the loss the
most, so per-sample weights for it have the most room to help.

* Candidates: every Linear / Conv1d / Conv2d / transformers Conv1D that the model family's adapter
  offers, with a non-zero gradient from the loss on the selection batch, at most `max_weights` weights,
  whose weight is not an input embedding's.
* Cost: one batched forward evaluates P perturbations at once: the N samples are repeated P times along
  the batch and copy p runs with W + ε_p through `per_sample_weights`. The model runs K·N sample
  forwards per candidate in chunks of P·N (P from a memory budget for the repeated deltas).
* Perturbation scale: σ is relative to the layer's own weight std, so layers with different
  initialisation scales are perturbed comparably (σ = 0.1 by default: large enough to move the loss
  well above float32 noise, small enough to stay near the trained weights).
* Entropy estimator: the KDE p̂ is a mixture of K Gaussians of width h, so H(p̂) = −∫ p̂ log p̂ is a
  1-D integral of a smooth (analytic) function. It is computed by the trapezoid rule on a grid of
  spacing h/2 restricted to points within 6h of some loss value (the density is below e^-18 of a
  kernel's peak beyond), with p̂ evaluated exactly (all K kernels, float64). The trapezoid rule
  converges exponentially fast for such integrands: against scipy.stats.gaussian_kde integrated on a
  fine grid the difference is ~1e-8 nats (tests/test_selection.py). So the result is the KDE's entropy
  itself, not a resubstitution estimate (which is biased by the kernel's self-term and by evaluating
  at the data instead of under p̂), and it needs no random draws. Cost: N · G · K kernel
  evaluations with G ≈ 2·range/h + 24 grid points per sample, about 100 for K = 10,000 Gaussian-like
  losses (h shrinks like K^-1/5, so the cost grows like K^1.2).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import AUTO
from .integrations import ModelAdapter, get_adapter
from .layers import is_hf_conv1d, is_supported
from .losses import LossFn, check_per_sample, resolve_loss
from .modes import eval_mode
from .per_sample import per_sample_weights
from .prefix import reuse_prefix
from .screening import Screening, linearised_entropy, per_sample_grad_norms

# What layer="auto" on a wrapper uses unless `selection_kwargs` says otherwise: 32 samples, every
# candidate screened, then the full criterion on at most 3 of them within about 45 s (docs/selection.md).
AUTO_SELECTION: dict[str, Any] = {"finalists": 3, "budget_s": 45.0, "max_samples": 32}

GRID_STEPS_PER_BANDWIDTH = 2
GRID_HALF_WIDTH = 6.0  # bandwidths around each loss value covered by the integration grid
_F32_EPS = float(torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class LayerScore:
    """One candidate's Eq. 6 score: the sum over samples of the entropy (nats) of its loss KDE."""

    name: str
    kind: str
    shape: tuple[int, ...]
    num_weights: int
    score: float
    loss_std: float  # mean over samples of the std of the K perturbed losses
    perturbation_std: float  # σ · std(W): the std of the Gaussian added to each weight
    seconds: float
    order: int  # position in the model's module order (for plots)


@dataclass
class SelectionReport:
    """Scores of every candidate (best first), the winner, the runner-up and why other layers were dropped."""

    scores: list[LayerScore]
    winner: str
    runner_up: str | None
    dropped: dict[str, str]
    num_perturbations: int
    sigma: float
    num_samples: int
    seed: int
    seconds: float
    loss: str
    base_loss: float  # mean unperturbed loss on the selection samples
    # linearised Eq. 6 of every candidate (ocd_hf.screening), when the candidates were screened first;
    # then only the best `len(scores)` of them got the full criterion
    screen: dict[str, float] = dataclasses.field(default_factory=dict)

    def score_of(self, name: str) -> float:
        for s in self.scores:
            if s.name == name:
                return s.score
        raise KeyError(f"{name!r} was not scored; scored layers: {[s.name for s in self.scores]}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for s in d["scores"]:
            s["shape"] = list(s["shape"])
        return d

    def summary(self) -> dict[str, Any]:
        """Short provenance record (stored in OCDConfig.extra['selection'] by the wrapper)."""
        return {
            "criterion": "entropy of the loss under weight perturbation (Eq. 6)",
            "winner": self.winner,
            "runner_up": self.runner_up,
            "scores": {s.name: round(s.score, 4) for s in self.scores},
            "num_perturbations": self.num_perturbations,
            "sigma": self.sigma,
            "num_samples": self.num_samples,
            "seed": self.seed,
            **({"screened": len(self.screen), "finalists": [s.name for s in self.scores]} if self.screen else {}),
        }

    def to_markdown(self) -> str:
        lines = [
            "| rank | layer | type | weights | entropy score (nats) | mean loss std | time (s) |",
            "|---:|---|---|---:|---:|---:|---:|",
        ]
        for i, s in enumerate(self.scores, 1):
            shape = "×".join(map(str, s.shape))
            lines.append(
                f"| {i} | {s.name} | {s.kind} {shape} | {s.num_weights:,} | {s.score:.2f} | {s.loss_std:.3g} | {s.seconds:.2f} |"
            )
        lines += ["", f"Winner: **{self.winner}**; runner-up: {self.runner_up or '—'}."]
        lines.append(
            f"K = {self.num_perturbations:,} perturbations per layer, sigma = {self.sigma} × the layer's weight std, "
            f"{self.num_samples} samples (mean loss {self.base_loss:.4g}), seed {self.seed}, loss {self.loss}; "
            f"{self.seconds:.1f} s in total."
        )
        if self.screen:
            lines.append(
                f"The {len(self.screen)} candidates were screened by the linearised criterion (one backward pass); "
                f"the best {len(self.scores)} got the full one. Screening scores: "
                + ", ".join(f"{n} {v:.1f}" for n, v in sorted(self.screen.items(), key=lambda kv: -kv[1]))
                + "."
            )
        if self.dropped:
            lines += ["", "Not candidates:"]
            lines += [f"- {name}: {why}" for name, why in self.dropped.items()]
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write a bar chart of the scores (network order, winner highlighted) to `path` (PNG)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError(
                "SelectionReport.plot needs matplotlib: pip install 'ocd_hf[plot]' (or pip install matplotlib)."
            ) from e
        rows = sorted(self.scores, key=lambda s: s.order)
        fig = Figure(figsize=(max(4.0, 0.55 * len(rows) + 1.5), 3.8), layout="constrained")
        ax = fig.add_subplot()
        colors = ["tab:orange" if s.name == self.winner else "tab:blue" for s in rows]
        values = [s.score for s in rows]
        # Scores are sums of differential entropies and often negative: bars rise from just below the
        # lowest score so that the tallest bar is the winner.
        span = (max(values) - min(values)) or 1.0
        bottom = min(0.0, min(values) - 0.1 * span)
        bars = ax.bar(range(len(rows)), [v - bottom for v in values], bottom=bottom, color=colors)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=2)
        ax.set_xticks(range(len(rows)), [s.name for s in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("Σ entropy of loss KDE (nats)")
        ax.set_ylim(bottom, max(values) + 0.15 * span)
        ax.set_title(
            title or f"Layer selection (K={self.num_perturbations:,}, σ={self.sigma}): {self.winner}", fontsize=9
        )
        path = Path(path)
        fig.savefig(path, dpi=120)
        return path


# ---------------------------------------------------------------------------------------------- entropy
def silverman_bandwidth(values: torch.Tensor) -> torch.Tensor:
    """Bandwidth per row of `values` [N, K], as scipy.stats.gaussian_kde(bw_method="silverman") in 1-D:
    h = std(ddof=1) · (3K/4)^(-1/5)."""
    k = values.shape[-1]
    return values.std(dim=-1, unbiased=True) * (3.0 * k / 4.0) ** -0.2


@torch.no_grad()
def kde_entropy(values: torch.Tensor, chunk_elements: int = 2**22) -> torch.Tensor:
    """Differential entropy (nats) of the Gaussian KDE (Silverman bandwidth) of each row of `values` [N, K].

    Computed by the trapezoid rule on a grid of spacing h/2 restricted to points within 6h of some value,
    with the density evaluated exactly (see the module docstring). A row whose values are all equal gets
    the bandwidth of a float32 rounding step instead of zero (a finite, very low entropy, not −∞).
    """
    if values.dim() == 1:
        return kde_entropy(values[None], chunk_elements)[0]
    v = values.detach().to(torch.float64)
    n, k = v.shape
    if k < 2:
        raise ValueError(f"The KDE entropy needs at least 2 values per sample; got {k}.")
    if not torch.isfinite(v).all():
        raise ValueError("The KDE entropy got non-finite values.")
    h = silverman_bandwidth(v)
    h = torch.maximum(h, _F32_EPS * v.abs().amax(dim=1).clamp_min(1.0))
    delta = h / GRID_STEPS_PER_BANDWIDTH
    s, _ = v.sort(dim=1)
    # Grid point g of row n is x = s[n, 0] - W·h + g·δ. Data point i covers the indices [a_i, b_i];
    # a_i and b_i never decrease with i, so each point adds only the indices after b_{i-1}: the union
    # of all windows, without duplicates, built without sorting.
    width = int(2 * GRID_HALF_WIDTH * GRID_STEPS_PER_BANDWIDTH)
    rel = (s - s[:, :1]) / delta[:, None]
    a = torch.ceil(rel).long()
    b = torch.floor(rel).long() + width
    prev_b = torch.cat([torch.full((n, 1), -1, dtype=torch.long), b[:, :-1]], dim=1)
    start = torch.maximum(a, prev_b + 1)
    counts = (b - start + 1).clamp_min(0).flatten()
    owner = torch.repeat_interleave(torch.arange(n * k), counts)
    first = torch.cumsum(counts, 0) - counts
    g = start.flatten()[owner] + (torch.arange(owner.numel()) - first[owner])
    row = owner // k
    x = s[row, 0] - GRID_HALF_WIDTH * h[row] + g.to(torch.float64) * delta[row]

    ent = torch.zeros(n, dtype=torch.float64)
    log_norm = math.log(k) + 0.5 * math.log(2 * math.pi)
    step = max(1, chunk_elements // k)
    for r, xr in enumerate(x.split(torch.bincount(row, minlength=n).tolist())):
        for xi in xr.split(step):
            # Every grid point lies within 6h of a value, so the largest kernel term is >= e^-18 and a
            # plain sum of exponentials cannot underflow (no log-sum-exp needed).
            z = (xi[:, None] - v[r]).div_(h[r] * math.sqrt(2.0))
            log_p = z.square_().neg_().exp_().sum(dim=1).log_() - log_norm - h[r].log()
            ent[r] -= (log_p.exp() * log_p).sum() * delta[r]
    return ent


# ---------------------------------------------------------------------------------------------- batches
def _map_batch(obj: Any, batch: int, fn) -> Any:
    """Apply `fn` to every tensor whose first dimension is the batch, inside dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, Mapping):
        return {key: _map_batch(val, batch, fn) for key, val in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_batch(val, batch, fn) for val in obj)
    return obj


def _repeat(obj: Any, batch: int, p: int) -> Any:
    """Copy p of the batch occupies rows [p·B, (p+1)·B)."""
    return _map_batch(obj, batch, lambda t: t.repeat(p, *([1] * (t.dim() - 1))))


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def prepare_batch(adapter: ModelAdapter, data: Any, max_samples: int | None) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of at most `max_samples` samples on the model's device; `data` is a batch or a Dataset."""
    if _is_dataset(data):
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("The selection data is empty.")
        loader = DataLoader(data, batch_size=max_samples or len(data), shuffle=False, collate_fn=adapter.collate_fn())  # type: ignore[arg-type]
        data = next(iter(loader))
    try:
        inputs, targets = adapter.split_batch(adapter.to_device(data, _module_device(adapter.module)))
    except Exception as e:
        raise ValueError(f"The selection batch could not be split into inputs and targets: {e}") from e
    if not isinstance(targets, torch.Tensor) or targets.dim() == 0:
        raise ValueError(
            f"The selection batch needs targets as a tensor with the batch first; got {type(targets).__name__}."
        )
    b = targets.shape[0]
    if max_samples is not None and b > max_samples:
        inputs, targets = _map_batch((inputs, targets), b, lambda t: t[:max_samples])
    return inputs, targets


def _is_dataset(data: Any) -> bool:
    """A collection of rows (torch Dataset, HF `datasets.Dataset`, a list of rows) rather than one batch."""
    if isinstance(data, Dataset):
        return True
    if isinstance(data, list):
        return bool(data) and isinstance(data[0], (tuple, Mapping))
    if isinstance(data, (Mapping, tuple, torch.Tensor, str)):
        return False
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _per_sample_loss(adapter: ModelAdapter, inputs: Any, targets: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    try:
        out = adapter.forward(adapter.module, inputs)
        losses = loss_fn(out, targets)
    except Exception as e:
        raise RuntimeError(
            f"The selection batch could not be run through the model and the loss ({type(e).__name__}: {e}). "
            "Pass a batch the model accepts: (inputs, targets) or a dict with a 'labels' entry, and a matching loss."
        ) from e
    return check_per_sample(losses, targets.shape[0])


# ---------------------------------------------------------------------------------------------- candidates
def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)) or is_hf_conv1d(m)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def find_candidates(
    adapter: ModelAdapter,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    layer: str | Sequence[str] | None = None,
    max_weights: int = 1_000_000,
    per_sample: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, str], Screening]:
    """Candidate layers (name → module, model order), dropped layers (name → reason) and the `Screening`
    of the pass (base losses [N]; per-sample gradient norms with `per_sample`).

    Runs one forward and backward on the batch (model as it is, normally eval mode) to find the layers
    whose weight receives a non-zero gradient from the loss.
    """
    module = adapter.module
    supported = adapter.candidate_layers()
    if layer is None or layer == AUTO:
        names = [n for n, m in module.named_modules() if n and (n in supported or _is_weight_layer(m))]
    else:
        requested = [layer] if isinstance(layer, str) else list(layer)
        if not requested:
            raise ValueError("layer=[] names no layer; pass 'auto', a layer name or a non-empty list of names.")
        for name in requested:
            try:
                module.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"No layer named {name!r} in {type(module).__name__}. Candidate layers: {list(supported)}"
                ) from None
        names = list(dict.fromkeys(requested))
    embeddings = {_storage(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    dropped: dict[str, str] = {}
    kept: dict[str, nn.Module] = {}
    for name in names:
        m = module.get_submodule(name)
        if isinstance(m, nn.Embedding):
            dropped[name] = "input embedding"
        elif not is_supported(m):
            extra = f", padding_mode={m.padding_mode!r}" if isinstance(m, nn.modules.conv._ConvNd) else ""
            dropped[name] = f"unsupported layer type {type(m).__name__}{extra}"
        elif _storage(m.weight) in embeddings:
            dropped[name] = "tied to an input embedding (shares its weight)"
        elif m.weight.numel() > max_weights:
            dropped[name] = f"too large ({m.weight.numel():,} weights > max_weights={max_weights:,})"
        else:
            kept[name] = m
    screening = per_sample_grad_norms(
        lambda: _per_sample_loss(adapter, inputs, targets, loss_fn), kept, int(targets.shape[0]), per_sample
    )
    grads = screening.grads.values()
    for (name, _), g in zip(list(kept.items()), grads):
        if g is None:
            dropped[name] = "no gradient path to the loss"
        elif not torch.count_nonzero(g):
            dropped[name] = "zero gradient on the selection batch"
        elif not torch.isfinite(g).all():
            dropped[name] = "non-finite gradient on the selection batch"
        elif name not in supported:  # e.g. timm's Conv2dSame, which pads inside its own forward
            dropped[name] = f"not a candidate layer of the {adapter.family} adapter"
        else:
            continue
        del kept[name]
    order = {n: i for i, n in enumerate(names)}
    dropped = dict(sorted(dropped.items(), key=lambda kv: order[kv[0]]))
    return kept, dropped, screening


# ---------------------------------------------------------------------------------------------- scoring
def _layer_seed(seed: int, name: str) -> int:
    """Each layer's draws depend only on (seed, name): restricting the candidates leaves scores unchanged."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63


@torch.inference_mode()
def perturbed_losses(
    adapter: ModelAdapter,
    layer: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    num_perturbations: int,
    perturbation_std: float,
    generator: torch.Generator,
    chunk_size: int | None = None,
    max_chunk_elements: int = 2**21,
    max_chunk_rows: int = 2048,
    reuse: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Per-sample losses [N, K] with K independent draws W + ε_k, ε_k ~ N(0, perturbation_std²).

    One forward runs `chunk_size` perturbations: the N samples repeated P times, copy p with W + ε_p.
    By default P keeps the repeated deltas under `max_chunk_elements` and the batch under `max_chunk_rows`
    (small chunks that stay in cache measured fastest on CPU, see docs/selection.md). The buffers are
    allocated once per layer.
    """
    w = layer.weight
    n = targets.shape[0]
    shape = tuple(w.shape)
    if chunk_size is None:
        chunk_size = max(1, min(max_chunk_elements // (n * w.numel()), max_chunk_rows // n))
    chunk_size = min(chunk_size, num_perturbations)
    eps_buf = torch.empty((chunk_size, *shape), device=w.device, dtype=w.dtype)
    delta_buf = torch.empty((chunk_size * n, *shape), device=w.device, dtype=w.dtype)
    out = torch.empty(num_perturbations, n, dtype=torch.float64)
    full, rest = divmod(num_perturbations, chunk_size)
    done = 0

    def run_chunk(p: int, x: Any, y: torch.Tensor) -> None:
        nonlocal done
        eps = eps_buf[:p].normal_(0.0, perturbation_std, generator=generator)
        delta = delta_buf[: p * n]
        delta.view(p, n, *shape).copy_(eps[:, None].expand(p, n, *shape))
        with per_sample_weights(layer, delta):
            losses = loss_fn(adapter.forward(adapter.module, x), y)
        out[done : done + p] = losses.view(p, n).to(device="cpu", dtype=torch.float64)
        done += p
        if on_chunk is not None:
            on_chunk(p)

    # every full chunk feeds the same repeated batch: the layers before `layer` run once (ocd_hf.prefix);
    # the smaller last chunk has another batch size and runs on its own
    x, y = _repeat(inputs, n, chunk_size), _repeat(targets, n, chunk_size)
    with reuse_prefix(adapter.module, layer, reuse):
        for _ in range(full):
            run_chunk(chunk_size, x, y)
    if rest:
        run_chunk(rest, _repeat(inputs, n, rest), _repeat(targets, n, rest))
    return out.T.contiguous()


def select_layer(
    model: Any,
    batch: Any,
    loss: str | LossFn | None = None,
    *,
    layer: str | Sequence[str] | None = None,
    num_perturbations: int = 1000,
    sigma: float = 0.1,
    max_samples: int | None = 64,
    max_weights: int = 1_000_000,
    seed: int = 0,
    finalists: int | None = None,
    budget_s: float | None = None,
    min_perturbations: int = 32,
    chunk_size: int | None = None,
    max_chunk_elements: int = 2**21,
    max_chunk_rows: int = 2048,
    adapter: ModelAdapter | None = None,
    progress: bool = False,
) -> SelectionReport:
    """Score candidate layers of `model` by Eq. 6 on `batch` and return the report (winner first).

    With `finalists` or `budget_s`, every candidate is first screened by the linearised criterion
    (`ocd_hf.screening`, one forward and backward for all layers) and only the best ones get the full
    criterion: at most `finalists` of them, and no more than fit `budget_s` seconds with at least
    `min_perturbations` draws each (K is lowered to fit too, never below `min_perturbations`). Without
    either, every candidate gets the full criterion with K = `num_perturbations`.

    Args:
        model: The model (any family of `ocd_hf.integrations`).
        batch: One batch as the family's adapter expects it ((inputs, targets) or a dict with 'labels'),
            or a Dataset whose first `max_samples` samples are used.
        loss: "cross_entropy", "mse" or a callable(output, target) -> [B]; the family's default when None.
        layer: None / "auto" for every supported layer, or a name / list of names to restrict the candidates.
        num_perturbations: K (the paper uses 10,000; 1,000 ranks the layers the same on the digits model at
            a tenth of the cost, see docs/selection.md).
        sigma: Perturbation std relative to each layer's weight std.
        max_samples: Samples of `batch` used.
        max_weights: Larger layers are not scored.
        seed: Seeds each layer's perturbations (with its name).
        finalists: How many of the best-screened layers get the full criterion (None: all, unless
            `budget_s` allows fewer).
        budget_s: Seconds the whole selection may take (estimated from the screening pass; None: no limit).
        min_perturbations: The least K a finalist is scored with when a budget applies.
        chunk_size: Perturbations one forward evaluates (see `perturbed_losses`).
        max_chunk_elements: Bound on the repeated deltas of one chunk.
        max_chunk_rows: Bound on the rows of one chunk.
        adapter: The family's adapter; found from the registry when None.
        progress: Print the plan and its time estimate, and show a tqdm bar per scored layer.

    The model's mode, weights and requires_grad flags are restored afterwards.
    """
    if num_perturbations < 2 or min_perturbations < 2:
        raise ValueError(
            f"num_perturbations and min_perturbations must be >= 2 (a KDE needs several losses); got "
            f"{num_perturbations} and {min_perturbations}."
        )
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0; got {sigma}.")
    if finalists is not None and finalists < 1:
        raise ValueError(f"finalists must be >= 1 or None; got {finalists}.")
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s must be > 0 seconds or None; got {budget_s}.")
    adapter = adapter or get_adapter(model)
    if loss is None:
        loss = adapter.default_loss
    if loss is None:
        raise ValueError(
            "Layer selection needs a loss: pass loss='cross_entropy', loss='mse' or a callable(output, target) -> [B]."
        )
    loss_fn = resolve_loss(loss)
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    say = _printer(progress)
    if finalists is not None or budget_s is not None:
        say("layer selection: screening every candidate layer (one forward and backward pass)")
    t0 = time.perf_counter()
    module = adapter.module
    with eval_mode(module):
        inputs, targets = prepare_batch(adapter, batch, max_samples)
        screened = finalists is not None or budget_s is not None
        kept, dropped, screening = find_candidates(adapter, inputs, targets, loss_fn, layer, max_weights, screened)
        base = screening.losses
        if not kept:
            reasons = "; ".join(f"{n}: {why}" for n, why in dropped.items()) or "the model has no supported layer"
            raise ValueError(f"No candidate layer left for selection. Dropped: {reasons}.")
        order = {n: i for i, n in enumerate(kept)}
        stds = {name: _perturbation_std(m, sigma) for name, m in kept.items()}
        names, k, screen = list(kept), num_perturbations, {}
        chunks = dict(chunk_size=chunk_size, max_chunk_elements=max_chunk_elements, max_chunk_rows=max_chunk_rows)
        if screened:
            screen = {
                n: linearised_entropy(g, stds[n], screening.losses) if g is not None else math.inf
                for n, g in screening.grad_norms.items()
                if n in kept
            }
            names = sorted(kept, key=lambda n: (-screen[n], order[n]))[: finalists or len(kept)]
            if budget_s is not None:
                per_draw = _probe(names, kept, adapter, inputs, targets, loss_fn)
                left = budget_s - (time.perf_counter() - t0)
                names, k = _fit_budget(names, per_draw, left, num_perturbations, min_perturbations)
                chunks["max_chunk_rows"] = min(max_chunk_rows, BUDGET_CHUNK * int(targets.shape[0]))
                estimate = f", about {k * sum(per_draw[n] for n in names):.0f} s"
            else:
                estimate = ""
            if len(kept) > len(names):
                say(
                    f"layer selection: full Eq. 6 on the best {len(names)} of {len(kept)} ({', '.join(names)}) with "
                    f"K={k} perturbations each{estimate}"
                    + (
                        f" (budget_s={budget_s:g}; raise it with selection_kwargs={{'budget_s': ...}})"
                        if budget_s
                        else ""
                    )
                )
            else:
                screen = {}  # every candidate gets the full criterion
        scores = [
            _score_layer(
                name,
                kept[name],
                adapter,
                inputs,
                targets,
                loss_fn,
                k,
                stds[name],
                sigma,
                seed,
                order[name],
                chunks,
                progress,
            )
            for name in names
        ]
    scores.sort(key=lambda s: (-s.score, s.order))
    return SelectionReport(
        scores=scores,
        winner=scores[0].name,
        runner_up=scores[1].name if len(scores) > 1 else None,
        dropped=dropped,
        num_perturbations=k,
        sigma=sigma,
        num_samples=int(targets.shape[0]),
        seed=seed,
        seconds=time.perf_counter() - t0,
        loss=loss_name,
        base_loss=float(base.float().mean()),
        screen=screen,
    )


def _printer(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    from tqdm.auto import tqdm

    return tqdm.write


def _perturbation_std(m: nn.Module, sigma: float) -> float:
    """σ · std(W) (the RMS when the std is 0, 1 when that is 0 too)."""
    w = m.weight.detach()
    wstd = float(w.float().std()) if w.numel() > 1 else 0.0
    if not wstd > 0:
        wstd = float(w.float().pow(2).mean().sqrt()) or 1.0
    return sigma * wstd


# Perturbations per forward while a budget applies: the layers before the target run on the repeated
# batch once per layer, so a large chunk makes that first pass cost chunk times a plain forward.
BUDGET_CHUNK = 8


def _probe(
    names: Sequence[str],
    kept: dict[str, nn.Module],
    adapter: ModelAdapter,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
) -> dict[str, float]:
    """Seconds per perturbation of each layer, timed on 2 perturbations (the first pass included: an overestimate)."""
    out = {}
    for name in names:
        t = time.perf_counter()
        perturbed_losses(adapter, kept[name], inputs, targets, loss_fn, 2, 0.0, torch.Generator(), chunk_size=1)
        out[name] = (time.perf_counter() - t) / 2
    return out


def _fit_budget(
    names: list[str], per_draw: dict[str, float], seconds: float, num_perturbations: int, min_perturbations: int
) -> tuple[list[str], int]:
    """The most finalists (best first) and the largest K <= num_perturbations that fit `seconds`.

    Finalists are dropped from the end until K reaches `min_perturbations`; the best-screened layer is
    always scored, with at least `min_perturbations` draws even over budget.
    """
    names = list(names)
    while True:
        k = int(seconds / max(sum(per_draw[n] for n in names), 1e-9))
        if k >= min_perturbations or len(names) == 1:
            return names, max(min_perturbations, min(num_perturbations, k))
        names.pop()


def _score_layer(
    name: str,
    m: nn.Module,
    adapter: ModelAdapter,
    inputs: Any,
    targets: torch.Tensor,
    loss_fn: LossFn,
    k: int,
    perturbation_std: float,
    sigma: float,
    seed: int,
    order: int,
    chunks: dict[str, Any],
    progress: bool,
) -> LayerScore:
    """The full Eq. 6 score of one layer with K draws."""
    t1 = time.perf_counter()
    w = m.weight.detach()
    g = torch.Generator(device=w.device).manual_seed(_layer_seed(seed, name))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=k, desc=f"Eq. 6 {name}", unit="perturbation", leave=False)
    try:
        losses = perturbed_losses(
            adapter, m, inputs, targets, loss_fn, k, perturbation_std, g, **chunks, on_chunk=bar.update if bar else None
        )
    finally:
        if bar is not None:
            bar.close()
    if not torch.isfinite(losses).all():
        raise FloatingPointError(
            f"Perturbing {name!r} with sigma={sigma} gave non-finite losses; lower sigma or check the batch."
        )
    entropy = kde_entropy(losses)
    seconds = time.perf_counter() - t1
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(f"  {name}: {float(entropy.sum()):.2f} nats ({seconds:.1f} s)")
    return LayerScore(
        name=name,
        kind=type(m).__name__,
        shape=tuple(w.shape),
        num_weights=w.numel(),
        score=float(entropy.sum()),
        loss_std=float(losses.std(dim=1).mean()),
        perturbation_std=perturbation_std,
        seconds=seconds,
        order=order,
    )
