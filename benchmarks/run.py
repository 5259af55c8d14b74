"""One (task, seed) run of the paper-tables benchmark: every head and variant trained, calibrated and scored.

Per run, on the task's own train / val / test split (`benchmarks.tasks`):
- heads: "train collection" (deltas on the base model's own training samples: the paper's recipe),
  "cross-fit collection" (K-fold out-of-fold deltas, base refit per fold), the selection's best other
  layer, the task's body layer if it names one (SetFit: a head inside the sentence-transformer, with
  its own complete rows, "body layer: ..."), and the ideas' variants (overfit budget, classifier-free
  guidance);
- every head's delta_scale is calibrated on val (OCDWrapper.calibrate: 0 = switched off);
- evaluation on test (`ocd_hf.evaluation.evaluate`) with all rows: the train-collection head also with
  1, 2 and 10 DDIM steps; the predicted-label rival's cost per sample is in "extra"; for
  classification, the margin diagnostic under the same labels ("margins": label -> correct / wrong ->
  statistics).

A run is a JSON-able record; its row labels are the evaluation's rows (`ocd_hf.evaluation.Row`) with
the head they come from, built by the label functions below and nowhere else.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ocd_hf.evaluation import Cosine, Row, compute_metrics

CROSS_FIT_FOLDS = 5
BUDGETS = {
    "1 step, lr 5e-4": (1, 5e-4),
    "10 steps, lr 1e-3": (10, 1e-3),
    "10 steps, lr 1e-2": (10, 1e-2),
}  # default: 3 steps, 5e-4
DEFAULT_BUDGET = "3 steps, lr 5e-4 (default)"
GUIDANCE = (1.0, 2.0, 4.0)
ENSEMBLES = (1, 5, 10)
GATES = (0.5, 0.7, 0.9, 0.99, 1.01)  # apply the delta only where the base model's max probability < τ
# calibration rules compared on every head (`rule_comparison`): label -> (rule, k) of `choose_scale`
# ("k SE" labels: the "se" rule at k; the runs of 2026-12-04 saved "2 SE (default)" for "2 SE")
RULES = {
    "2 SE": ("se", 2.0),
    "1 SE": ("se", 1.0),
    "best on val, no guard": ("se", 0.0),
    "shrinkage, k = 1": ("shrinkage", 1.0),
    "shrinkage, k = 2": ("shrinkage", 2.0),
}
NUM_SAMPLES = 5  # draws of the main evaluation's ensemble rows
FEW_STEPS = (1, 2, 3, 5, 10)  # DDIM step counts of the main head's sampler rows (10: the configured count)
DISTILL_STEPS = 300  # `ocd.distill`'s student steps for the main head's distilled row (quick: 10)

# how a head's training deltas were collected
TRAIN = "train collection"
CROSS_FIT = "cross-fit collection"
COLLECTIONS = (TRAIN, CROSS_FIT)
ALTERNATIVE = "alternative layer"  # the head on the selection's runner-up layer (train collection)
# the head on the task's body layer (`Task.body_layer`, SetFit): train collection, factored target, its own
# evaluation with every row; a 384x384 full target is 147k numbers per sample from 40 training samples
BODY = "body layer"
BODY_TARGET = "factored"


# ---------------------------------------------------------------------------------------------- labels
def ocd(collection: str) -> str:
    """The row of one OCD draw of the head collected `collection`-wise, e.g. 'OCD (train collection)'."""
    return f"OCD ({collection})"


def ocd_uncalibrated(collection: str) -> str:
    return f"{ocd(collection)} at delta_scale 1"


def ocd_ensemble(collection: str, num_samples: int) -> str:
    return f"{ocd(collection)} x{num_samples}"


def ocd_mean_weights(collection: str, num_samples: int) -> str:
    return f"{ocd(collection)} mean-weights x{num_samples}"


def ocd_steps(collection: str, steps: int) -> str:
    """One draw of the head collected `collection`-wise, sampled with `steps` DDIM steps."""
    return f"{ocd(collection)}, {steps} DDIM step{'' if steps == 1 else 's'}"


def ocd_distilled(collection: str) -> str:
    """One draw of the head collected `collection`-wise from its distilled one-pass student."""
    return f"{ocd(collection)}, distilled student"


def sampler_rows(collection: str) -> dict[str, str]:
    """The evaluation's sampler rows (DDIM step counts, the distilled student) -> their labels."""
    return {Row.ddim_steps(n): ocd_steps(collection, n) for n in FEW_STEPS} | {Row.DISTILLED: ocd_distilled(collection)}


def control(row: str, collection: str) -> str:
    """A control row (nearest-neighbour, mean delta) on the collection of a head other than the main one."""
    return f"{row} ({collection})"


def body_row(row: str) -> str:
    """An evaluation row (`ocd_hf.evaluation.Row`) of the body-layer head, e.g. 'body layer: OCD'."""
    return f"{BODY}: {row}"


def body_rows(rows) -> dict[str, str]:
    """The body-layer evaluation's rows -> their labels; base and temperature scaling are the main table's."""
    return {row: body_row(row) for row in rows if row not in (Row.BASE, Row.TEMPERATURE)}


def runner_up(layer: str) -> str:
    return f"OCD on the runner-up layer ({layer})"


def cosine_key(collection: str, cosine: str) -> str:
    """The key of a head's mean cosine to the oracle (`ocd_hf.evaluation.Cosine`) in a run's "cosine"."""
    return f"{ocd(collection)}: {cosine}"


def head_rows(collection: str, num_samples: int) -> dict[str, str]:
    """The evaluation's OCD rows -> their labels for the head collected `collection`-wise."""
    return {
        Row.OCD: ocd(collection),
        Row.OCD_UNCALIBRATED: ocd_uncalibrated(collection),
        Row.ensemble(num_samples): ocd_ensemble(collection, num_samples),
        Row.mean_weights(num_samples): ocd_mean_weights(collection, num_samples),
    }


def budget_head(budget: str, collection: str) -> str:
    """The calibration / timing key of an overfit-budget head."""
    return f"budget {budget}, {collection}"


def budget_idea(budget: str, collection: str) -> str:
    return f"budget: {budget} ({collection})"


def guidance_idea(w: float, collection: str) -> str:
    return f"guidance w={w:g} ({collection})"


def ensemble_idea(num_samples: int, collection: str) -> str:
    return f"ensemble x{num_samples} ({collection})"


def gate_idea(collection: str) -> str:
    return f"confidence gate ({collection})"


def idea_row(label: str) -> str:
    """The row an idea is scored by: an ensemble's own row, every other idea's single draw."""
    ensembles = {ensemble_idea(n, c): Row.ensemble(n) for n in ENSEMBLES[1:] for c in COLLECTIONS}
    return ensembles.get(label, Row.OCD)


def is_gate_idea(label: str) -> bool:
    return label in {gate_idea(c) for c in COLLECTIONS}


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class RunSettings:
    """What a run needs from the command line (picklable, for worker processes).

    Args:
        data_root: the folder with vision/, tabular/ and text/.
        quick: tiny sizes and budgets (a smoke test).
        threads: torch threads per process.
        perturbations: K of the layer selection.
        head_steps: OCD head training steps per head (0: the task's own).
        ideas: also run the issue-8 variants.
        all_layers_oracle: also evaluate the oracle on all layers.
    """

    data_root: str
    quick: bool = False
    threads: int = 1
    perturbations: int = 300
    head_steps: int = 1000
    ideas: bool = True
    all_layers_oracle: bool = True


def run_one(name: str, seed: int, settings: RunSettings) -> dict[str, Any]:
    """Build the task, train every head, evaluate; returns a JSON-able record."""
    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate

    from .tasks import build_task, split_kwargs

    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    task = build_task(name, seed, data_root=settings.data_root, quick=settings.quick)
    rec: dict[str, Any] = {
        "task": name,
        "seed": seed,
        "kind": task.kind,
        "layer": task.layer,
        "sizes": task.sizes,
        "paper": task.paper,
        "base_seconds": task.base_seconds,
        "rows": {},
        "cosine": {},
        "health": {},
        "calibration": {},
        "seconds": {},
        "margins": {},
        "rules": {},
    }
    kw, train_kw = split_kwargs(task.ocd_kwargs)
    if settings.head_steps and not settings.quick:
        train_kw["num_train_steps"] = settings.head_steps
    train_kw["seed"] = seed
    bs = task.batch_size
    ev = dict(batch_size=max(bs, 64), seed=seed, progress=False)
    fold_cache: dict[tuple, Any] = {}

    def train_fn(subset):
        # the same K folds recur for every cross-fitted variant: train each fold's base model once
        key = _rows_key(subset)
        if key not in fold_cache:
            fold_cache[key] = task.train_fn(subset)
        return fold_cache[key]

    def make(layer=task.layer, **over):
        return OCDWrapper.from_pretrained(task.model, layer=layer, **{**kw, **over})

    def head(label, ocd, collect_dir, cross_fit=False):
        t = time.perf_counter()
        store = ocd.collect(
            task.train,
            task.loss,
            batch_size=bs,
            collect_dir=collect_dir,
            progress=False,
            cross_fit=train_fn if cross_fit else None,
            num_folds=min(CROSS_FIT_FOLDS, len(task.train)),
            **train_kw,
        )
        ocd.train_head(store, progress=False, **train_kw)
        rec["calibration"][label] = ocd.calibrate(task.val, batch_size=max(bs, 64), seed=seed, progress=False)
        rec["rules"][label] = rule_comparison(ocd, task, seed, max(bs, 64))
        rec["seconds"][label] = time.perf_counter() - t
        return ocd, store

    def add(report, collection, rename, only_renamed=False):
        for row, metrics in report.rows.items():
            if row in rename or not only_renamed:
                rec["rows"][rename.get(row, row)] = metrics
        for row, groups in report.margins.items():
            if row in rename or not only_renamed:
                rec["margins"][rename.get(row, row)] = groups
        for k, v in report.cosine_to_oracle.items():
            rec["cosine"][cosine_key(collection, k)] = v
        if report.health:
            rec["health"][ocd(collection)] = report.health

    with tempfile.TemporaryDirectory(prefix="ocd-bench-") as tmp:
        tmp = Path(tmp)
        # the selection ranks the candidate layers; the best one other than the paper's layer is the alternative
        t = time.perf_counter()
        candidates = _candidates(task)
        sel = make(layer="auto").select_layer(
            task.train, task.loss, layer=candidates, num_perturbations=settings.perturbations, max_samples=64
        )
        ranking = [s.name for s in sel.scores]
        alt_layer = next((n for n in ranking if n != task.layer), None)
        rec["selection"] = {
            "ranking": ranking,
            "winner": sel.winner,
            "alternative": alt_layer,
            "seconds": time.perf_counter() - t,
        }

        ocd_tr, store_tr = head(TRAIN, make(), tmp / "train")
        # the one-pass student gets its own row; the main rows stay the 10-step teacher's
        t = time.perf_counter()
        rec["distillation"] = ocd_tr.distill(
            store_tr, num_steps=10 if settings.quick else DISTILL_STEPS, seed=seed, progress=False
        )
        ocd_tr.config = ocd_tr.config.replace(sampler="ddim")
        rec["seconds"]["distillation"] = time.perf_counter() - t
        alt = None
        if alt_layer is not None:
            big = _numel(ocd_tr, alt_layer) > 65536  # e.g. a 384x1536 body layer: generate u only (docs/factored.md)
            alt, _ = head(ALTERNATIVE, make(layer=alt_layer, target="factored" if big else "full"), tmp / "alt")
        t = time.perf_counter()
        rep = evaluate(
            ocd_tr,
            task.test,
            num_samples=NUM_SAMPLES,
            validation=task.val,
            train=task.train,
            collection=store_tr,
            alternative=alt,
            oracle_all_layers=settings.all_layers_oracle,
            inference_steps=FEW_STEPS,
            **ev,
        )
        rec["seconds"]["evaluation"] = time.perf_counter() - t
        rename = head_rows(TRAIN, NUM_SAMPLES) | sampler_rows(TRAIN)
        if alt_layer is not None:
            rename[Row.alternative(alt_layer)] = runner_up(alt_layer)
        add(rep, TRAIN, rename)
        rec["extra"] = rep.extra

        if task.body_layer is not None:
            ocd_body, store_body = head(BODY, make(layer=task.body_layer, target=BODY_TARGET), tmp / "body")
            t = time.perf_counter()
            rep_body = evaluate(
                ocd_body,
                task.test,
                num_samples=NUM_SAMPLES,
                validation=task.val,
                train=task.train,
                collection=store_body,
                inference_steps=FEW_STEPS,
                **ev,
            )
            add(rep_body, BODY, body_rows(rep_body.rows), only_renamed=True)
            rec["body"] = {
                "layer": task.body_layer,
                "target": BODY_TARGET,
                "shape": list(ocd_body.module.get_submodule(task.body_layer).weight.shape),
                "extra": rep_body.extra,
                "evaluation_seconds": time.perf_counter() - t,
            }

        ocd_cf, store_cf = head(CROSS_FIT, make(), tmp / "crossfit", cross_fit=True)
        rep_cf = evaluate(ocd_cf, task.test, num_samples=NUM_SAMPLES, collection=store_cf, **ev)
        add(rep_cf, CROSS_FIT, head_rows(CROSS_FIT, NUM_SAMPLES), only_renamed=True)
        for row in (Row.MEAN_DELTA, Row.NEAREST_NEIGHBOUR):
            rec["rows"][control(row, CROSS_FIT)] = rep_cf.rows[row]

        if settings.ideas:
            rec["ideas"] = ideas(task, seed, make, head, {TRAIN: ocd_tr, CROSS_FIT: ocd_cf}, tmp, ev)
    rec["seconds"]["total"] = time.perf_counter() - t0
    return rec


def rule_comparison(ocd, task, seed: int, batch_size: int) -> dict[str, Any]:
    """What each calibration rule (`RULES`) picks on validation and what that value gains on test.

    The draws are `calibrate`'s own (one per sample, generator seeded with `seed`, the same batch size),
    so the default rule's pick is the head's delta_scale. Gains are in the task's loss (CE, or squared
    error for regression), base minus the rule's value, mean over test samples with their standard error.
    """
    import math

    from ocd_hf.calibration import choose_scale, grid_losses
    from ocd_hf.training_args import OCDTrainingArguments

    grid = OCDTrainingArguments().calibration_grid

    def per_sample(dataset):
        gen = torch.Generator(device=ocd.device).manual_seed(seed)
        draw = lambda inputs, cond, base_out: ocd.generate_deltas(cond, 1, gen, delta_scale=1.0)[0]  # noqa: E731
        return grid_losses(ocd, dataset, ocd.loss_fn, grid, draw, batch_size=batch_size, progress=False)

    val, test = per_sample(task.val), per_sample(task.test)

    def on_test(scale: float) -> dict[str, float]:
        gain = test[0.0] - test[scale]
        return {
            "delta_scale": scale,
            "test_gain": float(gain.mean()),
            "test_gain_se": float(gain.std() / math.sqrt(len(gain))) if len(gain) > 1 else 0.0,
        }

    rules = {name: on_test(choose_scale(val, rule=r, min_gain_se=k)["delta_scale"]) for name, (r, k) in RULES.items()}
    best_test = min(test, key=lambda g: (float(test[g].mean()), g))
    return {
        "rules": rules,
        "best_on_test": on_test(best_test),  # hindsight: the ceiling of any rule on this grid
        "val_mean_loss": {str(g): float(v.mean()) for g, v in val.items()},
        "test_mean_loss": {str(g): float(v.mean()) for g, v in test.items()},
    }


def ideas(task, seed, make, head, heads, tmp: Path, ev: dict) -> dict[str, Any]:
    """Variants of issue 8, each scored on test at its val-calibrated delta_scale (and at 1)."""
    from ocd_hf.evaluation import evaluate

    out: dict[str, Any] = {}

    def score(ocd, label, num_samples=1):
        rep = evaluate(ocd, task.test, num_samples=num_samples, **ev)
        keep = [Row.OCD, Row.BASE] + ([Row.ensemble(num_samples)] if num_samples > 1 else [])
        rows = {row: rep.rows[row] for row in keep + [Row.OCD_UNCALIBRATED] if row in rep.rows}
        out[label] = {
            "rows": rows,
            "delta_scale": ocd.delta_scale,
            "cosine": rep.cosine_to_oracle.get(Cosine.OCD),
            "health": rep.health,
        }

    # 1. overfit budget (fold models are cached, so cross-fitting costs no base retraining here)
    for mode, cf in ((CROSS_FIT, True),):
        for label, (steps, lr) in BUDGETS.items():
            ocd, _ = head(
                budget_head(label, mode),
                make(overfit_steps=steps, overfit_lr=lr),
                tmp / f"b{steps}-{lr:g}-{mode[:5]}",
                cross_fit=cf,
            )
            score(ocd, budget_idea(label, mode))
    # 2. classifier-free guidance: one head trained with 10% condition dropout, sampled at several w
    for mode, cf in ((CROSS_FIT, True),):
        ocd, _ = head(f"cfg, {mode}", make(cond_dropout=0.1), tmp / f"cfg{mode[:5]}", cross_fit=cf)
        for w in GUIDANCE:
            ocd.config = ocd.config.replace(guidance_scale=w)
            ocd.delta_scale = 1.0
            ocd.calibrate(task.val, batch_size=ev["batch_size"], seed=seed, progress=False)
            score(ocd, guidance_idea(w, mode))
    # 3. ensemble size, and 4. a confidence gate, on the two main heads
    for mode, ocd in heads.items():
        for n in ENSEMBLES[1:]:
            score(ocd, ensemble_idea(n, mode), num_samples=n)
        if task.kind == "classification":
            out[gate_idea(mode)] = confidence_gate(ocd, task, seed, ev["batch_size"])
    return out


@torch.no_grad()
def confidence_gate(ocd, task, seed: int, batch_size: int) -> dict[str, Any]:
    """Apply OCD's delta (at delta_scale 1) only where the base model's max probability is below τ; τ from val."""

    def outputs(ds):
        base, ocd_out, ys = [], [], []
        gen = torch.Generator().manual_seed(seed)
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=ocd.adapter.collate_fn()):
            inputs, y = ocd.adapter.split_batch(ocd.adapter.to_device(batch, ocd.device))
            cond, b = ocd.conditioning(inputs)
            d = ocd.generate_deltas(cond, 1, gen, delta_scale=1.0)[0]
            base.append(b.float().cpu())
            ocd_out.append(ocd.forward_with_deltas(inputs, d).float().cpu())
            ys.append(y.cpu())
        return torch.cat(base), torch.cat(ocd_out), torch.cat(ys)

    def gated(base, o, tau):
        use = base.softmax(-1).max(-1).values < tau
        return torch.where(use[:, None], o, base), float(use.float().mean())

    def metrics(out, y):
        return compute_metrics(out, y, "classification")

    vb, vo, vy = outputs(task.val)
    val_ce = {tau: metrics(gated(vb, vo, tau)[0], vy)["cross_entropy"] for tau in GATES}
    tau = min(GATES, key=lambda t: (val_ce[t], -t))
    tb, to, ty = outputs(task.test)
    out, frac = gated(tb, to, tau)
    return {
        "tau": tau,
        "fraction_gated_in": frac,
        "rows": {Row.OCD: metrics(out, ty), Row.BASE: metrics(tb, ty)},
        "val_ce": {str(k): v for k, v in val_ce.items()},
    }


def _candidates(task) -> list[str] | None:
    """Candidate layers for the selection: all for the small models; the head and the last encoder block for SetFit."""
    if task.name.startswith("setfit"):
        from ocd_hf.integrations import get_adapter

        names = list(get_adapter(task.model).candidate_layers())
        return [n for n in names if n == task.layer or ".encoder.layer.5." in n]
    return None


def _rows_key(subset) -> tuple:
    """Which rows of the training set a cross-fit subset holds (a torch Subset or an HF datasets selection)."""
    if hasattr(subset, "indices"):
        return tuple(int(i) for i in subset.indices)
    idx = getattr(subset, "_indices", None)
    if idx is not None:
        return tuple(idx.column(0).to_pylist())
    return (len(subset),)


def _numel(ocd, layer: str) -> int:
    return ocd.module.get_submodule(layer).weight.numel()
