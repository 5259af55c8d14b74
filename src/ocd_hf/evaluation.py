"""Evaluation on a labelled test set: OCD against its upper bounds, its ablations and a skeptic's baselines.

Rows (each only when what it needs is given; their labels are the constants and functions of `Row`):
- base; base + temperature scaling (T fitted on `validation`); kNN in i_L space (on `train`);
- oracle on the selected layer (overfit on the test label: the paper's upper bound); oracle on all layers;
- OCD (1 draw, with the head's delta_scale), OCD ×N (probability average), OCD mean-weights ×N;
  OCD at delta_scale 1 when calibration changed it;
- nearest-neighbour ablation: the delta of the closest collected sample in i_L space (`collection`);
- no-scale ablation: the same Ω_0 times the mean training scale instead of ρ̂(x);
- mean-delta control: the mean training delta for every sample;
- OCD on an alternative layer (`alternative`, e.g. the selection's runner-up);
- predicted-label rival (classification): the oracle's overfitting steps toward the base model's own
  prediction (argmax), no diffusion model; uncalibrated, and at a delta_scale chosen on `validation` by
  the rule OCD's calibration uses (`ocd_hf.calibration.choose_scale`). Its cost per sample is in `extra`;
- sampler rows: one draw per DDIM step count in `inference_steps`, and one from the distilled student when
  the head has one, each at the head's delta_scale; their cosine to the oracle and generation ms per sample.
Metrics: cross-entropy, accuracy and ECE (15 bins) for classification; RMSE for regression. Also the
mean cosine of each generated delta to the oracle's, and the sampled Ω_0's health.

Margin diagnostic (classification, `EvaluationReport.margins`, computed by `ocd_hf.margins`): for the
samples the base model classifies correctly and for those it gets wrong, separately, the mean change
(± standard error over samples) in the true-class margin, the label's logit minus the largest other
logit of the model's outputs, under OCD (one draw, at the head's delta_scale, and at delta_scale 1 when
calibration changed it), the oracle and the predicted-label rival (uncalibrated and calibrated).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .calibration import DEFAULT_GRID, choose_scale, grid_losses
from .collection import DeltaStore
from .ensemble import combine_draws
from .losses import cross_entropy
from .margins import Group, MarginMeter
from .memory import overfit_method
from .overfit import overfit_all_layers, overfit_batch, probe_layer
from .prefix import reuse_prefix
from .training_args import OCDTrainingArguments

__all__ = [
    "Cosine",
    "EvaluationReport",
    "Group",
    "Row",
    "compute_metrics",
    "evaluate",
    "expected_calibration_error",
    "predicted_label_deltas",
]


class Row:
    """The labels of `EvaluationReport.rows`: constants, and functions for the labels with a number or a name.

    Compare and look rows up with these (`report.rows[Row.OCD]`), not with string literals.
    """

    BASE = "base"
    TEMPERATURE = "base + temperature scaling"
    KNN = "kNN in i_L space"
    ORACLE = "oracle, this layer (test label)"
    ORACLE_ALL_LAYERS = "oracle, all layers (test label)"
    OCD = "OCD"
    """One draw at the head's delta_scale."""
    OCD_UNCALIBRATED = "OCD at delta_scale 1"
    """One draw at delta_scale 1; present only when calibration changed delta_scale."""
    NEAREST_NEIGHBOUR = "nearest-neighbour delta"
    NO_SCALE = "no-scale ablation (mean training ρ)"
    MEAN_DELTA = "mean-delta control"
    PREDICTED_LABEL = "predicted-label rival"
    """The oracle's overfitting toward the base model's argmax instead of the label (classification)."""
    PREDICTED_LABEL_CALIBRATED = "predicted-label rival, calibrated"
    """The same deltas at a delta_scale chosen on `validation` by OCD's calibration rule."""
    DISTILLED = "OCD, distilled student"
    """One draw from the head's one-pass student (`ocd.distill`); present when the head has one."""

    @staticmethod
    def ensemble(num_samples: int) -> str:
        """The probability (classification) or output (regression) average of `num_samples` draws.

        Args:
            num_samples: draws averaged.
        """
        return f"OCD x{num_samples}"

    @staticmethod
    def mean_weights(num_samples: int) -> str:
        """One forward pass with the mean of `num_samples` drawn deltas.

        Args:
            num_samples: draws averaged.
        """
        return f"OCD mean-weights x{num_samples}"

    @staticmethod
    def ddim_steps(steps: int) -> str:
        """One draw sampled with `steps` DDIM steps (the `inference_steps` of `evaluate`).

        Args:
            steps: DDIM steps.
        """
        return f"OCD, {steps} DDIM steps"

    @staticmethod
    def alternative(layer: str) -> str:
        """OCD on another layer (the `alternative` wrapper given to `evaluate`).

        Args:
            layer: that wrapper's layer name.
        """
        return f"OCD on {layer}"


class Cosine:
    """The keys of `EvaluationReport.cosine_to_oracle`: whose deltas are compared with the oracle's."""

    OCD = "OCD (1 draw)"
    NEAREST_NEIGHBOUR = Row.NEAREST_NEIGHBOUR
    MEAN_DELTA = "mean training delta"
    PREDICTED_LABEL = Row.PREDICTED_LABEL
    DISTILLED = Row.DISTILLED

    @staticmethod
    def ddim_steps(steps: int) -> str:
        """One draw sampled with `steps` DDIM steps (`Row.ddim_steps`)."""
        return Row.ddim_steps(steps)


@dataclass
class EvaluationReport:
    task: str
    num_samples: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    cosine_to_oracle: dict[str, float] = field(default_factory=dict)
    # sampled Ω_0 std against the training targets' (see ocd_hf.health)
    health: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # classification: row -> Group.CORRECT / Group.WRONG -> {"n", "base_margin", "mean_change", "se"}
    margins: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def to_markdown(self) -> str:
        metrics = list(next(iter(self.rows.values())))
        lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for name, vals in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{vals[m]:.4f}" for m in metrics) + " |")
        if self.cosine_to_oracle:
            lines.append("")
            lines.append("Mean cosine to the oracle delta (held-out samples):")
            for name, v in self.cosine_to_oracle.items():
                lines.append(f"- {name}: {v:.3f}")
        if self.health:
            lines.append("")
            lines.append(
                f"Sampled Ω_0 std {self.health['omega_std']:.3f} vs training targets {self.health['target_std']:.3f}"
            )
        if self.margins:
            lines += ["", "Mean change in the true-class margin (± SE), by the base model's correctness:"]
            for name, groups in self.margins.items():
                lines.append(f"- {name}: " + "; ".join(f"{g} {_fmt_change(v)}" for g, v in groups.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt_change(stats: dict[str, Any]) -> str:
    if stats["mean_change"] is None:
        return "(n = 0)"
    se = "" if stats["se"] is None else f" ± {stats['se']:.3f}"
    return f"{stats['mean_change']:+.3f}{se} (n = {stats['n']})"


class _Meter:
    """Accumulates per-sample losses (and, for classification, confidences for ECE)."""

    def __init__(self, task: str, bins: int = 15):
        self.task, self.bins = task, bins
        self.losses: list[torch.Tensor] = []
        self.conf: list[torch.Tensor] = []
        self.hit: list[torch.Tensor] = []

    def add(self, out: torch.Tensor, target: torch.Tensor) -> None:
        out = out.detach().float().cpu()
        target = target.cpu()
        if self.task == "classification":
            self.losses.append(cross_entropy(out, target).double())
            p = out.log_softmax(-1).exp()
            conf, pred = p.max(-1)
            self.conf.append(conf)
            self.hit.append((pred == target).float())
        else:
            t = target.to(out.dtype).reshape(out.shape)
            self.losses.append((out - t).pow(2).flatten(1).mean(1).double())

    def per_sample(self) -> torch.Tensor:
        return torch.cat(self.losses)

    def result(self) -> dict[str, float]:
        loss = float(self.per_sample().mean())
        if self.task != "classification":
            return {"rmse": math.sqrt(loss)}
        conf, hit = torch.cat(self.conf), torch.cat(self.hit)
        return {
            "cross_entropy": loss,
            "accuracy": float(hit.mean()),
            "ece": expected_calibration_error(conf, hit, self.bins),
        }


def compute_metrics(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> dict[str, float]:
    """The evaluation's metrics of one set of outputs: what each row of `EvaluationReport.rows` holds.

    Args:
        outputs: model outputs (logits for classification), one row per sample.
        targets: class indices (classification) or regression targets.
        task: "classification" (cross_entropy, accuracy, ece) or "regression" (rmse).
    """
    meter = _Meter(task)
    meter.add(outputs, targets)
    return meter.result()


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: Σ_b |B_b|/n · |acc(B_b) − conf(B_b)|."""
    edges = torch.linspace(0, 1, bins + 1)
    idx = torch.bucketize(confidence.clamp(0, 1), edges[1:-1], right=True)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += float(m.float().mean() * (correct[m].mean() - confidence[m].mean()).abs())
    return ece


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the NLL of logits / T (Guo et al. 2017), by LBFGS on log T."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    logits, labels = logits.detach().float(), labels.detach()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@torch.no_grad()
def _embed(ocd: Any, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i_L, base outputs, targets) of a whole dataset."""
    adapter = ocd.adapter
    feats, outs, ys = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn()):
        inputs, targets = adapter.split_batch(adapter.to_device(batch, ocd.device))
        cond, out = ocd.conditioning(inputs)
        feats.append(cond.layer_input.float().cpu())
        outs.append(out.float().cpu())
        ys.append(targets.cpu())
    return torch.cat(feats), torch.cat(outs), torch.cat(ys)


class _KNN:
    """kNN on standardised i_L; k chosen on validation when given. Class probabilities are smoothed
    neighbour frequencies (+0.5 per class) so that cross-entropy stays finite."""

    def __init__(self, feats: torch.Tensor, ys: torch.Tensor, task: str, num_classes: int | None):
        self.mean, self.std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        self.feats, self.ys, self.task, self.c = (feats - self.mean) / self.std, ys, task, num_classes
        self.k = 10

    def __call__(self, feats: torch.Tensor, k: int | None = None) -> torch.Tensor:
        k = min(k or self.k, len(self.ys))
        d = torch.cdist((feats.float().cpu() - self.mean) / self.std, self.feats)
        nn_idx = d.topk(k, largest=False).indices
        y = self.ys[nn_idx]
        if self.task == "classification":
            counts = F.one_hot(y.long(), self.c).float().sum(1) + 0.5
            return (counts / counts.sum(1, keepdim=True)).log()
        return y.float().mean(1).reshape(len(feats), -1)

    def choose_k(self, feats: torch.Tensor, ys: torch.Tensor, grid=(1, 5, 10, 25, 50)) -> None:
        def loss(k):
            m = _Meter(self.task)
            m.add(self(feats, k), ys)
            return float(m.per_sample().mean())

        self.k = min((k for k in grid if k <= len(self.ys)), key=loss)


def predicted_label_deltas(ocd: Any, inputs: Any, base_out: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """The predicted-label rival's deltas: the oracle's overfitting steps toward `base_out.argmax(-1)`.

    On a sample the base model classifies correctly they are the oracle's deltas; no label is used.

    Args:
        ocd: An `OCDWrapper` (its layer, loss and `overfit_*` settings are used).
        inputs: A batch of model inputs.
        base_out: The base model's logits on `inputs`.
        method: `overfit_batch`'s method; give it (see `oracle_method`) when calling inside a
            `reuse_prefix` block, where the one-sample probe that would choose it cannot run.
    """
    c = ocd.config
    with torch.enable_grad():
        return overfit_batch(
            ocd.module,
            ocd.layer,
            inputs,
            base_out.argmax(-1),
            ocd.loss_fn,
            ocd.adapter.forward,
            c.overfit_steps,
            c.overfit_lr,
            c.overfit_optimizer,
            False,
            c.target,
            method=method,
        ).delta


def oracle_method(ocd: Any, dataset: Dataset) -> str | None:
    """`overfit_batch`'s method for `ocd`'s layer and settings, probed on the first sample of `dataset`.

    The probe is a one-sample forward, so it must run outside `reuse_prefix` (whose recorded prefix
    belongs to a whole batch); the method depends only on the layer's input rank, the same for every
    sample. None (let `overfit_batch` choose) when no probe is needed.

    Args:
        ocd: An `OCDWrapper`.
        dataset: Data of the kind the model takes.
    """
    c = ocd.config
    if not (c.target == "factored" and c.overfit_optimizer == "adam"):
        return None
    adapter = ocd.adapter
    first = next(iter(DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=adapter.collate_fn())))
    inputs, _ = adapter.split_batch(adapter.to_device(first, ocd.device))
    probe = probe_layer(ocd.module, ocd.layer, inputs, adapter.forward)
    return overfit_method(ocd.layer, c.overfit_optimizer, c.target, probe)


def _calibration_rule(ocd: Any) -> tuple[tuple[float, ...], str, float]:
    """(grid, rule, k) of the head's own calibration record, or the training defaults without one."""
    rec = ocd.state.calibration or {}
    grid = tuple(float(g) for g in rec["mean_loss"]) if "mean_loss" in rec else DEFAULT_GRID
    return grid, rec.get("rule", "se"), float(rec.get("min_gain_se", OCDTrainingArguments().calibration_min_gain_se))


def _generator(ocd: Any, seed: int) -> torch.Generator:
    return torch.Generator(device=ocd.device).manual_seed(seed)


def _sync(device: Any) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    ocd: Any,
    dataset: Dataset,
    *,
    num_samples: int = 5,
    batch_size: int = 256,
    seed: int = 0,
    validation: Dataset | None = None,
    train: Dataset | None = None,
    collection: DeltaStore | None = None,
    alternative: Any = None,
    oracle_all_layers: bool = False,
    inference_steps: tuple[int, ...] = (),
    progress: bool = True,
) -> EvaluationReport:
    """Evaluate `ocd` (a fitted OCDWrapper) on `dataset`; see the module docstring for the rows.

    `inference_steps` adds one row per DDIM step count (e.g. (1, 2) beside the config's 10), each drawn
    with its own generator seeded with `seed`.

    The predicted-label rival is calibrated with the grid, rule and k of `ocd`'s own calibration record
    (`FittedState.calibration`), or with the `OCDTrainingArguments` defaults when the head has none.
    """
    c = ocd.config
    task = c.task or "classification"
    classify = task == "classification"
    adapter = ocd.adapter
    gen, alt_gen = _generator(ocd, seed), _generator(ocd, seed)
    # the sampler rows: each step count, and the distilled student when the head has one; own generators
    samplers = {
        Row.ddim_steps(n): (c.replace(num_inference_steps=n, sampler="ddim"), _generator(ocd, seed))
        for n in inference_steps
    }
    if ocd.require_head().student is not None:
        samplers[Row.DISTILLED] = (c.replace(sampler="distilled"), _generator(ocd, seed))
    rows: dict[str, _Meter] = {}

    def meter(name: str) -> _Meter:
        return rows.setdefault(name, _Meter(task))

    extra: dict[str, Any] = {"delta_scale": ocd.delta_scale}
    method = oracle_method(ocd, dataset)
    temperature = knn = None
    # one pass over the validation set serves both the temperature and kNN's choice of k
    val_feats, val_out, val_y = _embed(ocd, validation, batch_size) if validation is not None else (None, None, None)
    if validation is not None and classify:
        temperature = fit_temperature(val_out, val_y)
        extra["temperature"] = temperature
    if train is not None:
        tr_feats, tr_out, tr_y = _embed(ocd, train, batch_size)
        knn = _KNN(tr_feats, tr_y, task, tr_out.shape[-1] if classify else None)
        if validation is not None:
            knn.choose_k(val_feats, val_y)
        extra["knn_k"] = knn.k
    nn_keys = nn_mean = nn_std = None
    mean_scale = None
    if collection is not None:
        nn_keys = collection.column("layer_input").float()
        nn_mean, nn_std = nn_keys.mean(0), nn_keys.std(0).clamp_min(1e-6)
        nn_keys = (nn_keys - nn_mean) / nn_std
        mean_scale = float(collection.column("scale").mean())
    rival_scale = None
    if validation is not None and classify:
        grid, rule, k = _calibration_rule(ocd)
        per = grid_losses(
            ocd,
            validation,
            ocd.loss_fn,
            grid,
            lambda inputs, cond, base_out: predicted_label_deltas(ocd, inputs, base_out, method),
            batch_size=batch_size,
            progress=progress,
            desc="calibrating the predicted-label rival",
        )
        record = choose_scale(per, rule=rule, min_gain_se=k)
        rival_scale = record["delta_scale"]
        extra["predicted_label_calibration"] = record
        extra["predicted_label_delta_scale"] = rival_scale
    cos: dict[str, list[torch.Tensor]] = {}
    margins = MarginMeter()
    omega_std = []
    seconds = {"predicted_label": 0.0, "ocd": 0.0}
    counted = [0]

    def layer_rows(inputs: Any, targets: torch.Tensor) -> None:
        """One batch's rows that change only ocd.layer: base, oracle on the layer, OCD and its ablations."""
        cond, base_out = ocd.conditioning(inputs)
        meter(Row.BASE).add(base_out, targets)
        if temperature is not None:
            meter(Row.TEMPERATURE).add(base_out / temperature, targets)
        if knn is not None:
            meter(Row.KNN).add(knn(cond.layer_input), targets)
        oracle = overfit_batch(
            ocd.module,
            ocd.layer,
            inputs,
            targets,
            ocd.loss_fn,
            adapter.forward,
            c.overfit_steps,
            c.overfit_lr,
            c.overfit_optimizer,
            False,
            c.target,
            method=method,
        ).delta
        oracle_out = ocd.forward_with_deltas(inputs, oracle)
        meter(Row.ORACLE).add(oracle_out, targets)
        counted[0] += len(targets)
        if classify:
            margins.add_base(base_out, targets)
            margins.add(Row.ORACLE, oracle_out, targets)
            _sync(ocd.device)
            t0 = time.perf_counter()
            rival = predicted_label_deltas(ocd, inputs, base_out, method)
            rival_out = ocd.forward_with_deltas(inputs, rival)
            _sync(ocd.device)
            seconds["predicted_label"] += time.perf_counter() - t0
            meter(Row.PREDICTED_LABEL).add(rival_out, targets)
            margins.add(Row.PREDICTED_LABEL, rival_out, targets)
            cos.setdefault(Cosine.PREDICTED_LABEL, []).append(_cosine(rival, oracle))
            if rival_scale is not None:
                calibrated = base_out if rival_scale == 0 else ocd.forward_with_deltas(inputs, rival_scale * rival)
                meter(Row.PREDICTED_LABEL_CALIBRATED).add(calibrated, targets)
                margins.add(Row.PREDICTED_LABEL_CALIBRATED, calibrated, targets)
        _sync(ocd.device)
        t0 = time.perf_counter()
        # raw deltas, so that the uncalibrated row exists even at delta_scale 0
        raw_all = ocd.generate_deltas(cond, num_samples, gen, delta_scale=1.0)
        ocd_first = ocd.forward_with_deltas(inputs, raw_all[0] * ocd.delta_scale)
        _sync(ocd.device)
        seconds["ocd"] += time.perf_counter() - t0
        deltas = raw_all * ocd.delta_scale
        omega_std.append(ocd.last_health.omega_std)
        outs = torch.stack([ocd_first] + [ocd.forward_with_deltas(inputs, d) for d in deltas[1:]])
        meter(Row.OCD).add(outs[0], targets)
        if classify:
            margins.add(Row.OCD, outs[0], targets)
        meter(Row.ensemble(num_samples)).add(combine_draws(outs, task), targets)
        meter(Row.mean_weights(num_samples)).add(ocd.forward_with_deltas(inputs, deltas.mean(0)), targets)
        raw = raw_all[0]
        for name, (sampling, sampler_gen) in samplers.items():
            _sync(ocd.device)
            t0 = time.perf_counter()
            # unscaled, so that the cosine exists at delta_scale 0; the row is at the head's delta_scale
            few = ocd.require_head().generate(
                cond, sampling, 1, sampler_gen, delta_scale=1.0, target_std=ocd.state.target_std
            )[0][0]
            _sync(ocd.device)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            few = few.to(raw.dtype)
            meter(name).add(ocd.forward_with_deltas(inputs, few * ocd.delta_scale), targets)
            cos.setdefault(name, []).append(_cosine(few, oracle))
        if ocd.delta_scale != 1.0:
            uncalibrated = ocd.forward_with_deltas(inputs, raw)
            meter(Row.OCD_UNCALIBRATED).add(uncalibrated, targets)
            if classify:
                margins.add(Row.OCD_UNCALIBRATED, uncalibrated, targets)
        cos.setdefault(Cosine.OCD, []).append(_cosine(raw, oracle))
        if collection is not None:
            q = (cond.layer_input.float().cpu() - nn_mean) / nn_std
            nearest = torch.cdist(q, nn_keys).argmin(1)
            nn_delta = (
                collection.get_batch(nearest.numpy())["delta"].to(oracle.device, oracle.dtype).reshape(oracle.shape)
            )
            meter(Row.NEAREST_NEIGHBOUR).add(ocd.forward_with_deltas(inputs, nn_delta), targets)
            cos.setdefault(Cosine.NEAREST_NEIGHBOUR, []).append(_cosine(nn_delta, oracle))
            rho = ocd.head.scale_net(ocd.head.normalize(cond)).view(-1, *([1] * (raw.dim() - 1)))
            # the same Ω_0 at the mean training scale, uncalibrated like the row it ablates
            no_scale = raw / rho.to(raw.dtype) * mean_scale
            meter(Row.NO_SCALE).add(ocd.forward_with_deltas(inputs, no_scale), targets)
        mean_delta = ocd.head.mean_delta.reshape(oracle.shape[1:]).to(oracle.dtype).expand_as(oracle)
        meter(Row.MEAN_DELTA).add(ocd.forward_with_deltas(inputs, mean_delta.contiguous()), targets)
        cos.setdefault(Cosine.MEAN_DELTA, []).append(_cosine(mean_delta, oracle))

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn())
    for batch in tqdm(loader, desc="evaluating", disable=not progress):
        inputs, targets = adapter.split_batch(adapter.to_device(batch, ocd.device))
        # every pass in this block changes only ocd.layer: what runs before it is computed once
        with reuse_prefix(ocd.module, ocd.layer, ocd.reuse_prefix):
            layer_rows(inputs, targets)
        if oracle_all_layers:
            out_all = overfit_all_layers(
                ocd.module,
                inputs,
                targets,
                ocd.loss_fn,
                adapter.forward,
                c.overfit_steps,
                c.overfit_lr,
                c.overfit_optimizer,
            )
            meter(Row.ORACLE_ALL_LAYERS).add(out_all, targets)
        if alternative is not None:
            alt_cond, _ = alternative.conditioning(inputs)
            alt_delta = alternative.generate_deltas(alt_cond, 1, alt_gen)[0]
            meter(Row.alternative(alternative.config.layer)).add(
                alternative.forward_with_deltas(inputs, alt_delta), targets
            )
    if classify and counted[0]:
        # wall time of the rival (overfitting + one forward) and of OCD (num_samples draws + one forward),
        # both after the shared conditioning pass; per sample of `dataset`
        extra["predicted_label_ms_per_sample"] = 1000 * seconds["predicted_label"] / counted[0]
        extra["ocd_ms_per_sample"] = 1000 * seconds["ocd"] / counted[0]
    if samplers and counted[0]:
        # one draw's generation (conditioning excluded), per sample of `dataset`
        extra["sampler_ms_per_sample"] = {name: 1000 * seconds[name] / counted[0] for name in samplers}
    health = {}
    if ocd.state.target_std:
        health = {"omega_std": sum(omega_std) / len(omega_std), "target_std": float(ocd.state.target_std)}
        health["ratio"] = health["omega_std"] / health["target_std"]
    return EvaluationReport(
        task=task,
        num_samples=num_samples,
        rows={n: m.result() for n, m in rows.items()},
        cosine_to_oracle={k: float(torch.cat(v).mean()) for k, v in cos.items()},
        health=health,
        extra=extra,
        margins=margins.result(),
    )
