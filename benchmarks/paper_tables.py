"""The paper's tables on offline stand-ins, 3 seeds, with every ablation, a skeptic's baselines and the
ideas of "make OCD actually help" (held-out collection, overfit budget, guidance, gating, ensembles).

    python benchmarks/paper_tables.py                      # 4 tasks x 3 seeds -> docs/results/paper_tables.{json,md}
    python benchmarks/paper_tables.py --quick --out-dir /tmp/x   # a smoke test (tiny sizes, ~2 min)
    python benchmarks/paper_tables.py --jobs 2             # runs (task, seed) pairs in 2 processes

Each (task, seed) run is saved to <runs-dir>/<task>-seed<seed>.json (default build/bench-runs) as soon as
it finishes and is skipped when present, so an interrupted run resumes (--force reruns); the tables
are rebuilt from the saved runs of the requested tasks and seeds.
Per run, on the task's own train / val / test split (benchmarks/tasks.py):
- heads: "train collection" (deltas on the base model's own training samples: the paper's recipe),
  "cross-fit collection" (K-fold out-of-fold deltas, base refit per fold), the selection's best other
  layer, and the ideas' variants (overfit budget, classifier-free guidance);
- every head's delta_scale is calibrated on val (OCDWrapper.calibrate: 0 = switched off);
- evaluation on test (ocd_hf.evaluation.evaluate) with all rows.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = ROOT / "docs" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
CROSS_FIT_FOLDS = 5
BUDGETS = {
    "1 step, lr 5e-4": (1, 5e-4),
    "10 steps, lr 1e-3": (10, 1e-3),
    "10 steps, lr 1e-2": (10, 1e-2),
}  # default: 3 steps, 5e-4
GUIDANCE = (1.0, 2.0, 4.0)
ENSEMBLES = (1, 5, 10)
SLOWNESS = {"setfit_8shot": 3, "fashion_lenet5": 2, "digits": 1, "california_mlp": 0}
GATES = (0.5, 0.7, 0.9, 0.99, 1.01)  # apply the delta only where the base model's max probability < τ


# ---------------------------------------------------------------------------------------------- one run
def run_one(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Build the task, train every head, evaluate; returns a JSON-able record."""
    from tasks import build_task, split_kwargs

    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    task = build_task(name, seed, data_root=args.data_root, quick=args.quick)
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
    }
    kw, train_kw = split_kwargs(task.ocd_kwargs)
    if args.head_steps and not args.quick:
        train_kw["num_train_steps"] = args.head_steps
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
        rec["seconds"][label] = time.perf_counter() - t
        return ocd, store

    def add(report, prefix, keep=None):
        for row, metrics in report.rows.items():
            if keep is None or row in keep:
                renamed = prefix and row.startswith("OCD") and not row.startswith("OCD on ")
                rec["rows"][row.replace("OCD", prefix, 1) if renamed else row] = metrics
        for k, v in report.cosine_to_oracle.items():
            rec["cosine"][f"{prefix}: {k}" if prefix else k] = v
        if report.health:
            rec["health"][prefix or "OCD"] = report.health

    with tempfile.TemporaryDirectory(prefix="ocd-bench-") as tmp:
        tmp = Path(tmp)
        # the selection ranks the candidate layers; the best one other than the paper's layer is the alternative
        t = time.perf_counter()
        candidates = _candidates(task)
        sel = make(layer="auto").select_layer(
            task.train, task.loss, layer=candidates, num_perturbations=args.perturbations, max_samples=64
        )
        ranking = [s.name for s in sel.scores]
        alt_layer = next((n for n in ranking if n != task.layer), None)
        rec["selection"] = {
            "ranking": ranking,
            "winner": sel.winner,
            "alternative": alt_layer,
            "seconds": time.perf_counter() - t,
        }

        ocd_tr, store_tr = head("train collection", make(), tmp / "train")
        alt = None
        if alt_layer is not None:
            big = _numel(ocd_tr, alt_layer) > 65536  # e.g. a 384x1536 body layer: generate u only (docs/factored.md)
            alt, _ = head("alternative layer", make(layer=alt_layer, target="factored" if big else "full"), tmp / "alt")
        t = time.perf_counter()
        rep = evaluate(
            ocd_tr,
            task.test,
            num_samples=5,
            validation=task.val,
            train=task.train,
            collection=store_tr,
            alternative=alt,
            oracle_all_layers=not args.no_all_layers_oracle,
            **ev,
        )
        rec["seconds"]["evaluation"] = time.perf_counter() - t
        add(rep, "OCD (train collection)")
        if alt is not None:
            rec["rows"][f"OCD on the runner-up layer ({alt_layer})"] = rec["rows"].pop(f"OCD on {alt_layer}")
        rec["extra"] = rep.extra

        ocd_cf, store_cf = head("cross-fit collection", make(), tmp / "crossfit", cross_fit=True)
        rep_cf = evaluate(ocd_cf, task.test, num_samples=5, collection=store_cf, **ev)
        add(rep_cf, "OCD (cross-fit collection)", keep={r for r in rep_cf.rows if r.startswith("OCD")})
        rec["rows"]["mean-delta control (cross-fit collection)"] = rep_cf.rows["mean-delta control"]
        rec["rows"]["nearest-neighbour delta (cross-fit collection)"] = rep_cf.rows["nearest-neighbour delta"]
        rec["rows"]["nearest-neighbour delta"] = rep.rows["nearest-neighbour delta"]
        rec["rows"]["mean-delta control"] = rep.rows["mean-delta control"]

        if not args.no_ideas:
            rec["ideas"] = ideas(
                task, seed, make, head, {"train collection": ocd_tr, "cross-fit collection": ocd_cf}, tmp, ev
            )
    rec["seconds"]["total"] = time.perf_counter() - t0
    return rec


def ideas(task, seed, make, head, heads, tmp: Path, ev: dict) -> dict[str, Any]:
    """Variants of issue 8, each scored on test at its val-calibrated delta_scale (and at 1)."""
    from ocd_hf.evaluation import evaluate

    out: dict[str, Any] = {}

    def score(ocd, label, num_samples=1):
        rep = evaluate(ocd, task.test, num_samples=num_samples, **ev)
        rows = {"OCD": rep.rows["OCD"], "base": rep.rows["base"]}
        if num_samples > 1:
            rows[f"OCD x{num_samples}"] = rep.rows[f"OCD x{num_samples}"]
        if "OCD at delta_scale 1" in rep.rows:
            rows["OCD at delta_scale 1"] = rep.rows["OCD at delta_scale 1"]
        out[label] = {
            "rows": rows,
            "delta_scale": ocd.delta_scale,
            "cosine": rep.cosine_to_oracle.get("OCD (1 draw)"),
            "health": rep.health,
        }

    # 1. overfit budget (fold models are cached, so cross-fitting costs no base retraining here)
    for mode, cf in (("cross-fit collection", True),):
        for label, (steps, lr) in BUDGETS.items():
            ocd, _ = head(
                f"budget {label}, {mode}",
                make(overfit_steps=steps, overfit_lr=lr),
                tmp / f"b{steps}-{lr:g}-{mode[:5]}",
                cross_fit=cf,
            )
            score(ocd, f"budget: {label} ({mode})")
    # 2. classifier-free guidance: one head trained with 10% condition dropout, sampled at several w
    for mode, cf in (("cross-fit collection", True),):
        ocd, _ = head(f"cfg, {mode}", make(cond_dropout=0.1), tmp / f"cfg{mode[:5]}", cross_fit=cf)
        for w in GUIDANCE:
            ocd.config = ocd.config.replace(guidance_scale=w)
            ocd.delta_scale = 1.0
            ocd.calibrate(task.val, batch_size=ev["batch_size"], seed=seed, progress=False)
            score(ocd, f"guidance w={w:g} ({mode})")
    # 3. ensemble size, and 4. a confidence gate, on the two main heads
    for mode, ocd in heads.items():
        for n in ENSEMBLES[1:]:
            score(ocd, f"ensemble x{n} ({mode})", num_samples=n)
        if task.kind == "classification":
            out[f"confidence gate ({mode})"] = confidence_gate(ocd, task, seed, ev["batch_size"])
    return out


@torch.no_grad()
def confidence_gate(ocd, task, seed: int, batch_size: int) -> dict[str, Any]:
    """Apply OCD's delta (at delta_scale 1) only where the base model's max probability is below τ; τ from val."""
    from torch.utils.data import DataLoader

    from ocd_hf.evaluation import _Meter

    def outputs(ds):
        base, ocd_out, ys = [], [], []
        gen = torch.Generator().manual_seed(seed)
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=ocd.adapter.collate_fn()):
            inputs, y = ocd.adapter.split_batch(ocd.adapter.to_device(batch, ocd.device))
            cond, b = ocd.conditioning(inputs)
            d = ocd.generate_deltas(cond, 1, gen, delta_scale=1.0)[0]
            (
                base.append(b.float().cpu()),
                ocd_out.append(ocd.forward_with_deltas(inputs, d).float().cpu()),
                ys.append(y.cpu()),
            )
        return torch.cat(base), torch.cat(ocd_out), torch.cat(ys)

    def gated(base, o, tau):
        use = base.softmax(-1).max(-1).values < tau
        return torch.where(use[:, None], o, base), float(use.float().mean())

    def metrics(out, y):
        m = _Meter("classification")
        m.add(out, y)
        return m.result()

    vb, vo, vy = outputs(task.val)
    val_ce = {tau: metrics(gated(vb, vo, tau)[0], vy)["cross_entropy"] for tau in GATES}
    tau = min(GATES, key=lambda t: (val_ce[t], -t))
    tb, to, ty = outputs(task.test)
    out, frac = gated(tb, to, tau)
    return {
        "tau": tau,
        "fraction_gated_in": frac,
        "rows": {"OCD": metrics(out, ty), "base": metrics(tb, ty)},
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


# ---------------------------------------------------------------------------------------------- tables
MAIN_ROWS = [
    "base",
    "base + temperature scaling",
    "kNN in i_L space",
    "oracle, this layer (test label)",
    "oracle, all layers (test label)",
    "OCD (train collection) at delta_scale 1",
    "OCD (train collection)",
    "OCD (train collection) x5",
    "OCD (train collection) mean-weights x5",
    "OCD (cross-fit collection) at delta_scale 1",
    "OCD (cross-fit collection)",
    "OCD (cross-fit collection) x5",
    "nearest-neighbour delta",
    "nearest-neighbour delta (cross-fit collection)",
    "no-scale ablation (mean training ρ)",
    "mean-delta control",
    "mean-delta control (cross-fit collection)",
]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt(values: list[float]) -> str:
    m, s = mean_sd(values)
    return f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"


def paired(runs: list[dict], a_get, b_get) -> dict[str, float]:
    """a − b per seed: mean, SD, and how many seeds have a < b (lower is better for every metric used)."""
    d = [a_get(r) - b_get(r) for r in runs]
    m, s = mean_sd(d)
    # below 1e-7 is rounding (e.g. an ensemble of identical draws), not a difference
    return {"mean": m, "sd": s, "n": len(d), "lower_in": sum(x < -1e-7 for x in d)}


def verdict(p: dict[str, float], metric: str, what: str, than: str) -> str:
    """'beyond noise' = the per-seed difference has the same sign in every seed and |mean| > 2 SE."""
    se = p["sd"] / math.sqrt(p["n"]) if p["n"] > 1 else float("inf")
    beyond = abs(p["mean"]) > max(2 * se, 1e-7) and p["lower_in"] in (0, p["n"])
    if beyond:
        word = "better than" if p["mean"] < 0 else "worse than"
    else:
        word = "no different (within noise) from"
    return f"{what} is {word} {than}: Δ{metric} = {p['mean']:+.4f} ± {p['sd']:.4f} (SD over {p['n']} seeds; lower in {p['lower_in']}/{p['n']})"


def aggregate(runs: list[dict]) -> tuple[dict, str]:
    """Mean ± SD tables per task; returns (JSON summary, markdown)."""
    by_task: dict[str, list[dict]] = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    summary: dict[str, Any] = {}
    md = [
        "## Paper tables on offline stand-ins (3 seeds)",
        "",
        "Command: `python benchmarks/paper_tables.py` (what `make bench` runs). Mean ± SD over seeds; lower is better "
        "for CE, ECE and RMSE. OCD rows use the head's delta_scale chosen on the validation split "
        "(`OCDWrapper.calibrate`, 0 = switched off when it does not beat base there by 2 SE); "
        '"at delta_scale 1" rows are the uncalibrated heads. "Oracle" rows overfit on the *test* label: '
        "upper bounds, not methods. Heads (benchmarks/tasks.py): U-Net channels (32, 32, 64), condition and scale "
        "widths 64, batch 64, 1,000 training steps each (`--head-steps`), 10 DDIM steps; cross-fitting uses 5 folds "
        "with the base model retrained per fold from the same initialisation. The ideas tables compare variants "
        "of one head at a time.",
        "",
    ]
    for name, rs in by_task.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        metric = "rmse" if rs[0]["kind"] == "regression" else "cross_entropy"
        metrics = ["rmse"] if metric == "rmse" else ["cross_entropy", "accuracy", "ece"]
        sizes = rs[0]["sizes"]
        md += [f"### {name}: layer `{rs[0]['layer']}`, seeds {[r['seed'] for r in rs]}", ""]
        md.append(
            "Data and budget: "
            + ", ".join(f"{k} {v}" for k, v in sizes.items())
            + f"; {_head_desc(rs[0])}; wall time per seed {fmt([r['seconds']['total'] for r in rs])} s."
        )
        md.append("")
        rows = [r for r in MAIN_ROWS if all(r in x["rows"] for x in rs)]
        rows += sorted({k for x in rs for k in x["rows"] if k.startswith("OCD on the runner-up")})
        table = {}
        md.append("| method | " + " | ".join(metrics) + " |")
        md.append("|---|" + "---|" * len(metrics))
        for row in rows:
            vals = [x["rows"].get(row) for x in rs]
            if any(v is None for v in vals):
                continue
            table[row] = {m: mean_sd([v[m] for v in vals]) for m in metrics}
            md.append(f"| {row} | " + " | ".join(fmt([v[m] for v in vals]) for m in metrics) + " |")
        md.append("")
        cos_keys = sorted({k for x in rs for k in x["cosine"]})
        md.append(
            "Mean cosine of deltas to the oracle's (per head: generated, nearest-neighbour, mean training delta): "
            + "; ".join(
                f"{k.replace(': OCD (1 draw)', ': generated')} {fmt([x['cosine'][k] for x in rs if k in x['cosine']])}"
                for k in cos_keys
            )
            + "."
        )
        cal = {
            lab: [x["calibration"][lab]["delta_scale"] for x in rs if lab in x["calibration"]]
            for lab in ("train collection", "cross-fit collection", "alternative layer")
        }
        md.append("Calibrated delta_scale per seed: " + "; ".join(f"{k} {v}" for k, v in cal.items() if v) + ".")
        hl = {
            k: [x["health"][k]["ratio"] for x in rs if k in x["health"]]
            for k in sorted({k for x in rs for k in x["health"]})
        }
        md.append(
            "Sampled Ω_0 std / training targets' std: " + "; ".join(f"{k} {fmt(v)}" for k, v in hl.items() if v) + "."
        )
        md.append("")
        verdicts = []
        get = lambda row: lambda r: r["rows"][row][metric]  # noqa: E731
        for row in (
            "OCD (train collection)",
            "OCD (cross-fit collection)",
            "OCD (train collection) at delta_scale 1",
            "OCD (cross-fit collection) at delta_scale 1",
        ):
            if row in rows:
                for other in ("base", "nearest-neighbour delta", "mean-delta control", "base + temperature scaling"):
                    if other in rows:
                        verdicts.append(verdict(paired(rs, get(row), get(other)), metric, row, other))
        md += ["Verdicts (" + metric + "):", ""] + [f"- {v}" for v in verdicts] + [""]
        if rs[0].get("paper"):
            p = rs[0]["paper"]
            md.append(
                "The paper's numbers for the setting this stands in for ("
                + ", ".join(f"{k} {v}" for k, v in p.items())
                + ")."
            )
            md.append("")
        summary[name] = {"metric": metric, "table": table, "verdicts": verdicts, "seeds": [r["seed"] for r in rs]}
        if any("ideas" in r for r in rs):
            md += ideas_markdown(name, rs, metric)
            summary[name]["ideas"] = {k: v for k, v in _ideas_table(rs, metric).items()}
    md[4:4] = headline(by_task)
    md += across_tasks({k: sorted(v, key=lambda r: r["seed"]) for k, v in by_task.items()})
    return summary, "\n".join(md) + "\n"


def headline(by_task: dict[str, list[dict]]) -> list[str]:
    """The answer first: did the shipped default (training-set collection, delta_scale from val) beat base?"""
    row = "OCD (train collection)"
    better, worse, lines = [], [], []
    for name, rs in by_task.items():
        m = "rmse" if rs[0]["kind"] == "regression" else "cross_entropy"
        if not all(row in r["rows"] for r in rs):
            continue
        p = paired(rs, lambda r: r["rows"][row][m], lambda r: r["rows"]["base"][m])
        v = verdict(p, m, "OCD", "base")
        lines.append(f"- {name}: {v}")
        if " better than " in v:
            better.append(name)
        if " worse than " in v:
            worse.append(name)
    n = len(lines)
    return (
        [
            "**Summary (generated from the tables below).** The shipped default, deltas collected on the training set "
            "with delta_scale chosen on validation, beats the base model beyond noise on "
            f"{len(better)} of {n} tasks ({', '.join(better) or 'none'}) and is worse beyond noise on "
            f"{len(worse)} ({', '.join(worse) or 'none'}):",
            "",
        ]
        + lines
        + [""]
    )


def _head_desc(r: dict) -> str:
    return (
        f"alternative layer = the best other layer of the selection (ranking, top 3: {r['selection']['ranking'][:3]})"
    )


def _ideas_table(rs: list[dict], metric: str) -> dict[str, dict]:
    labels = [k for k in rs[0]["ideas"] if all(k in r.get("ideas", {}) for r in rs)]
    out = {}
    for lab in labels:
        # an ensemble variant is scored by its ensemble row, every other by the single draw
        main = lab.split(" ")[1] if lab.startswith("ensemble x") else None
        key = f"OCD {main}" if main else "OCD"
        ocd = [r["ideas"][lab]["rows"][key][metric] for r in rs]
        base = [r["ideas"][lab]["rows"]["base"][metric] for r in rs]
        extra = {}
        for k in ("OCD x5", "OCD x10", "OCD at delta_scale 1"):
            if all(k in r["ideas"][lab]["rows"] for r in rs):
                extra[k] = mean_sd([r["ideas"][lab]["rows"][k][metric] for r in rs])
        knob = [r["ideas"][lab].get("delta_scale", r["ideas"][lab].get("tau")) for r in rs]
        out[lab] = {
            "ocd": mean_sd(ocd),
            "base": mean_sd(base),
            "diff": paired(
                rs, lambda r: r["ideas"][lab]["rows"][key][metric], lambda r: r["ideas"][lab]["rows"]["base"][metric]
            ),
            "extra": extra,
            "knob": knob,
        }
    return out


def budget_by_validation(rs: list[dict], metric: str) -> dict[str, Any] | None:
    """Per seed, the overfit budget (default or a BUDGETS variant, cross-fit collection) with the lowest
    validation loss at its calibrated delta_scale; its test metric. This is 'the budget tuned on validation'."""
    picks, tests = [], []
    for r in rs:
        options = {"3 steps, lr 5e-4 (default)": ("cross-fit collection", r["rows"].get("OCD (cross-fit collection)"))}
        for lab in BUDGETS:
            idea = r.get("ideas", {}).get(f"budget: {lab} (cross-fit collection)")
            options[lab] = (f"budget {lab}, cross-fit collection", idea["rows"]["OCD"] if idea else None)
        val = {}
        for lab, (cal_key, row) in options.items():
            cal = r["calibration"].get(cal_key)
            if cal is not None and row is not None:
                val[lab] = cal["mean_loss"][str(float(cal["delta_scale"]))]
        if not val:
            return None
        best = min(val, key=val.get)
        picks.append(best)
        tests.append(options[best][1][metric])
    base = [r["rows"]["base"][metric] for r in rs]
    return {
        "picks": picks,
        "ocd": mean_sd(tests),
        "diff": paired(rs, lambda r: tests[rs.index(r)], lambda r: r["rows"]["base"][metric]),
        "base": mean_sd(base),
    }


def ideas_markdown(name: str, rs: list[dict], metric: str) -> list[str]:
    t = _ideas_table(rs, metric)
    md = [
        f"#### {name}: ideas (test {metric}, mean ± SD over {len(rs)} seeds; base {fmt([r['rows']['base'][metric] for r in rs])})",
        "",
        "| variant | OCD, calibrated (ensembles: the ensemble) | OCD − base (per seed) | uncalibrated (delta_scale 1) | ensemble | delta_scale or τ per seed |",
        "|---|---|---|---|---|---|",
    ]
    for lab, v in t.items():
        d = v["diff"]
        ens = "; ".join(f"{k}: {m:.4f} ± {s:.4f}" for k, (m, s) in v["extra"].items() if k != "OCD at delta_scale 1")
        unc = v["extra"].get("OCD at delta_scale 1")
        md.append(
            f"| {lab} | {v['ocd'][0]:.4f} ± {v['ocd'][1]:.4f} | {d['mean']:+.4f} ± {d['sd']:.4f} (lower in {d['lower_in']}/{d['n']}) | "
            f"{'' if unc is None else f'{unc[0]:.4f} ± {unc[1]:.4f}'} | {ens} | {v['knob']} |"
        )
    ref = {
        k: fmt([r["rows"][k][metric] for r in rs])
        for k in ("base", "oracle, this layer (test label)", "nearest-neighbour delta")
        if all(k in r["rows"] for r in rs)
    }
    b = budget_by_validation(rs, metric)
    if b is not None:
        d = b["diff"]
        md.append(
            f"| budget chosen on validation (cross-fit collection) | {b['ocd'][0]:.4f} ± {b['ocd'][1]:.4f} | "
            f"{d['mean']:+.4f} ± {d['sd']:.4f} (lower in {d['lower_in']}/{d['n']}) |  |  | {b['picks']} |"
        )
    md.append("")
    md.append("For reference on the same seeds: " + "; ".join(f"{k} {v}" for k, v in ref.items()) + ".")
    md.append("")
    return md


def across_tasks(by_task: dict[str, list[dict]]) -> list[str]:
    """One row per variant, one column per task: OCD − base (mean ± SD over seeds, seeds where OCD is lower)."""
    cols = list(by_task)
    metric_of = {t: ("rmse" if rs[0]["kind"] == "regression" else "cross_entropy") for t, rs in by_task.items()}
    cells: dict[str, dict[str, str]] = {}

    def put(label, task, p):
        cells.setdefault(label, {})[task] = f"{p['mean']:+.4f} ± {p['sd']:.4f} ({p['lower_in']}/{p['n']})"

    for t, rs in by_task.items():
        m = metric_of[t]
        base = lambda r: r["rows"]["base"][m]  # noqa: E731
        for row, label in (
            ("OCD (train collection) at delta_scale 1", "train collection, uncalibrated (the paper's recipe)"),
            ("OCD (train collection)", "train collection, delta_scale from val"),
            ("OCD (train collection) x5", "train collection, delta_scale from val, x5"),
            ("OCD (cross-fit collection) at delta_scale 1", "cross-fit collection, uncalibrated"),
            ("OCD (cross-fit collection)", "cross-fit collection, delta_scale from val"),
            ("nearest-neighbour delta", "nearest-neighbour delta (train collection)"),
            ("base + temperature scaling", "temperature scaling (no OCD)"),
            ("kNN in i_L space", "kNN (no OCD)"),
        ):
            if all(row in r["rows"] for r in rs):
                put(label, t, paired(rs, lambda r, row=row: r["rows"][row][m], base))
        ideas_table = _ideas_table(rs, m) if all("ideas" in r for r in rs) else {}
        for lab, v in ideas_table.items():
            put(
                lab
                + (", τ from val, delta_scale 1" if lab.startswith("confidence gate") else ", delta_scale from val"),
                t,
                v["diff"],
            )
        b = budget_by_validation(rs, m) if all("ideas" in r for r in rs) else None
        if b is not None:
            put("budget chosen on validation (cross-fit collection)", t, b["diff"])
    md = [
        "## Every variant against the base model, across tasks",
        "",
        "OCD − base on each task's test metric ("
        + ", ".join(f"{t}: {metric_of[t]}" for t in cols)
        + "), mean ± SD over seeds, "
        "and in how many seeds the variant was lower (better). Negative is better.",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, row in cells.items():
        md.append(f"| {label} | " + " | ".join(row.get(t, "") for t in cols) + " |")
    return md + [""]


# ---------------------------------------------------------------------------------------------- main
def _worker(job: tuple[str, int, argparse.Namespace]) -> tuple[str, int, str | None]:
    name, seed, args = job
    path = Path(args.runs_dir) / f"{name}-seed{seed}.json"
    try:
        rec = run_one(name, seed, args)
    except Exception as e:  # one failed run must not lose the others; the failure is reported at the end
        import traceback

        return name, seed, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    _atomic_write(path, json.dumps(rec, indent=1))
    return name, seed, None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    from tasks import TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--data-root", default=str(DEFAULT_DATA), help="folder with vision/, tabular/, text/ (default ../shared/data)"
    )
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help="where paper_tables.{json,md} go")
    p.add_argument(
        "--runs-dir",
        default=str(ROOT / "build" / "bench-runs"),
        help="one JSON per finished (task, seed) run; reruns skip them",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets: a smoke test, numbers mean nothing")
    p.add_argument("--jobs", type=int, default=1, help="(task, seed) runs in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--perturbations", type=int, default=300, help="K of the layer selection")
    p.add_argument(
        "--head-steps",
        type=int,
        default=1000,
        help="OCD head training steps per head (a CPU budget; 0: the task's own)",
    )
    p.add_argument("--no-ideas", action="store_true", help="skip the issue-8 variants")
    p.add_argument("--no-all-layers-oracle", action="store_true")
    p.add_argument("--force", action="store_true", help="rerun runs that are already saved")
    args = p.parse_args(argv)
    if args.quick:
        args.perturbations = min(args.perturbations, 20)
    out = Path(args.out_dir)
    if not Path(args.data_root).is_dir():
        sys.exit(
            f"--data-root {args.data_root} is not a folder (it needs vision/, tabular/ and text/ from ../shared/data)."
        )
    # the slowest tasks first, so that parallel workers finish together
    order = sorted(args.tasks, key=lambda t: -SLOWNESS.get(t, 0))
    runs_dir = Path(args.runs_dir)
    jobs = [
        (t, s, args) for t in order for s in args.seeds if args.force or not (runs_dir / f"{t}-seed{s}.json").exists()
    ]
    t0 = time.perf_counter()
    failures = []
    if args.jobs > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for name, seed, err in pool.imap_unordered(_worker, jobs):
                print(
                    f"{name} seed {seed}: {'FAILED' if err else 'done'} ({time.perf_counter() - t0:.0f}s)", flush=True
                )
                if err:
                    failures.append((name, seed, err))
    else:
        for job in jobs:
            name, seed, err = _worker(job)
            print(f"{name} seed {seed}: {'FAILED' if err else 'done'} ({time.perf_counter() - t0:.0f}s)", flush=True)
            if err:
                failures.append((name, seed, err))
    runs = [
        json.loads(f.read_text())
        for f in sorted(runs_dir.glob("*.json"))
        if f.stem.rsplit("-seed", 1)[0] in args.tasks and int(f.stem.rsplit("-seed", 1)[1]) in args.seeds
    ]
    summary, md = aggregate(runs)
    meta = {
        "command": "python benchmarks/paper_tables.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": args.threads,
        "quick": args.quick,
        "seconds": time.perf_counter() - t0,
    }
    _atomic_write(out / "paper_tables.json", json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    _atomic_write(out / "paper_tables.md", md)
    print(md)
    for name, seed, err in failures:
        print(f"\n{name} seed {seed} failed:\n{err}", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
