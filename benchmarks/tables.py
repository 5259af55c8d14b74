"""The paper tables' Markdown (and the result files): mean ± SD per task, verdicts, the ideas, across tasks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ocd_hf.evaluation import Cosine, Group, Row

from . import run
from .stats import beyond_noise, fmt, mean_sd, paired, paired_verdict

COMMAND = "python -m benchmarks.paper_tables"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so that a reader never sees half a file.

    Args:
        path: the file to write (its folder is created).
        text: the contents.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table.

    Args:
        header: column titles.
        rows: cells, one list per row.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main_rows() -> list[str]:
    """The rows of each task's table, in order (those present in every seed are shown)."""
    return [
        Row.BASE,
        Row.TEMPERATURE,
        Row.KNN,
        Row.ORACLE,
        Row.ORACLE_ALL_LAYERS,
        run.ocd_uncalibrated(run.TRAIN),
        run.ocd(run.TRAIN),
        run.ocd_ensemble(run.TRAIN, run.NUM_SAMPLES),
        run.ocd_mean_weights(run.TRAIN, run.NUM_SAMPLES),
        *run.sampler_rows(run.TRAIN).values(),
        run.ocd_uncalibrated(run.CROSS_FIT),
        run.ocd(run.CROSS_FIT),
        run.ocd_ensemble(run.CROSS_FIT, run.NUM_SAMPLES),
        Row.NEAREST_NEIGHBOUR,
        run.control(Row.NEAREST_NEIGHBOUR, run.CROSS_FIT),
        Row.NO_SCALE,
        Row.MEAN_DELTA,
        run.control(Row.MEAN_DELTA, run.CROSS_FIT),
        Row.PREDICTED_LABEL,
        Row.PREDICTED_LABEL_CALIBRATED,
    ]


def body_table_rows() -> list[str]:
    """The rows of the body-layer head's table (`run.BODY`), in order; base is the main table's."""
    return [Row.BASE] + [
        run.body_row(r)
        for r in (
            Row.ORACLE,
            Row.KNN,
            Row.OCD_UNCALIBRATED,
            Row.OCD,
            Row.ensemble(run.NUM_SAMPLES),
            Row.mean_weights(run.NUM_SAMPLES),
            Row.NEAREST_NEIGHBOUR,
            Row.NO_SCALE,
            Row.MEAN_DELTA,
            Row.PREDICTED_LABEL,
            Row.PREDICTED_LABEL_CALIBRATED,
            *(Row.ddim_steps(n) for n in run.FEW_STEPS),
        )
    ]


def margin_rows() -> list[str]:
    """The rows of the margin diagnostic's table, in order (those present in every seed are shown)."""
    return [
        Row.ORACLE,
        run.ocd_uncalibrated(run.TRAIN),
        run.ocd(run.TRAIN),
        run.ocd_uncalibrated(run.CROSS_FIT),
        run.ocd(run.CROSS_FIT),
        Row.PREDICTED_LABEL,
        Row.PREDICTED_LABEL_CALIBRATED,
    ] + [
        run.body_row(r)
        for r in (
            Row.ORACLE,
            Row.OCD_UNCALIBRATED,
            Row.OCD,
            Row.PREDICTED_LABEL,
            Row.PREDICTED_LABEL_CALIBRATED,
        )
    ]


def metric_of(rec: dict) -> str:
    """The headline metric of a run record: rmse for regression, cross_entropy for classification."""
    return "rmse" if rec["kind"] == "regression" else "cross_entropy"


def calibration_ks(runs: list[dict]) -> list[float]:
    """The k (standard errors) the runs' heads were calibrated with; records without one used 2."""
    return sorted({c.get("min_gain_se", 2.0) for r in runs for c in r["calibration"].values()})


def aggregate(runs: list[dict]) -> tuple[dict, str]:
    """Mean ± SD tables per task; returns (JSON summary, markdown)."""
    by_task: dict[str, list[dict]] = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    summary: dict[str, Any] = {}
    ks = calibration_ks(runs)
    md = [
        "## Paper tables on offline stand-ins (3 seeds)",
        "",
        f"Command: `{COMMAND}` (`make bench` adds `--no-ideas`, `make bench-ideas` does not). Mean ± SD over seeds; lower is better "
        "for CE, ECE and RMSE. OCD rows use the head's delta_scale chosen on the validation split "
        "(`OCDWrapper.calibrate`, 0 = switched off when it does not beat base there by "
        f"{' or '.join(f'{k:g}' for k in ks)} SE, the k these runs calibrated with); "
        '"at delta_scale 1" rows are the uncalibrated heads. "Oracle" rows overfit on the *test* label: '
        "upper bounds, not methods. Heads (benchmarks/tasks.py): U-Net channels (32, 32, 64), condition and scale "
        "widths 64, batch 64, 1,000 training steps each (`--head-steps`), 10 DDIM steps; cross-fitting uses 5 folds "
        "with the base model retrained per fold from the same initialisation. The ideas tables compare variants "
        "of one head at a time.",
        "",
    ]
    generated = {run.cosine_key(c, Cosine.OCD): run.cosine_key(c, "generated") for c in (*run.COLLECTIONS, run.BODY)}
    for name, rs in by_task.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        metric = metric_of(rs[0])
        metrics = ["rmse"] if metric == "rmse" else ["cross_entropy", "accuracy", "ece"]
        sizes = rs[0]["sizes"]
        md += [f"### {name}: layer `{rs[0]['layer']}`, seeds {[r['seed'] for r in rs]}", ""]
        md.append(
            "Data and budget: "
            + ", ".join(f"{k} {v}" for k, v in sizes.items())
            + f"; {_head_desc(rs[0])}; wall time per seed {fmt([r['seconds']['total'] for r in rs])} s."
        )
        md.append("")
        rows = [r for r in main_rows() if all(r in x["rows"] for x in rs)]
        rows += sorted(
            {run.runner_up(x["selection"]["alternative"]) for x in rs if x["selection"]["alternative"] is not None}
        )
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
        md += cost_lines(rs)
        cos_keys = sorted({k for x in rs for k in x["cosine"]})
        md.append(
            "Mean cosine of deltas to the oracle's (per head: generated, nearest-neighbour, mean training delta): "
            + "; ".join(
                f"{generated.get(k, k)} {fmt([x['cosine'][k] for x in rs if k in x['cosine']])}" for k in cos_keys
            )
            + "."
        )
        cal = {
            lab: [x["calibration"][lab]["delta_scale"] for x in rs if lab in x["calibration"]]
            for lab in (run.TRAIN, run.CROSS_FIT, run.ALTERNATIVE, run.BODY)
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
            run.ocd(run.TRAIN),
            run.ocd(run.CROSS_FIT),
            run.ocd_uncalibrated(run.TRAIN),
            run.ocd_uncalibrated(run.CROSS_FIT),
        ):
            if row in rows:
                for other in (Row.BASE, Row.NEAREST_NEIGHBOUR, Row.MEAN_DELTA, Row.TEMPERATURE):
                    if other in rows:
                        verdicts.append(paired_verdict(paired(rs, get(row), get(other)), metric, row, other))
        md += ["Verdicts (" + metric + "):", ""] + [f"- {v}" for v in verdicts] + [""]
        md += sampler_markdown(name, rs, metric)
        md += body_markdown(name, rs, metrics, table)
        md += margins_markdown(name, rs)
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
            summary[name]["ideas"] = dict(ideas_table(rs, metric))
    md[4:4] = headline(by_task)
    md += across_tasks({k: sorted(v, key=lambda r: r["seed"]) for k, v in by_task.items()})
    md += rules_markdown({k: sorted(v, key=lambda r: r["seed"]) for k, v in by_task.items()})
    return summary, "\n".join(md) + "\n"


RIVALS = (Row.TEMPERATURE, Row.NEAREST_NEIGHBOUR, Row.PREDICTED_LABEL, Row.PREDICTED_LABEL_CALIBRATED)


def headline(by_task: dict[str, list[dict]]) -> list[str]:
    """The answer first: did the shipped default (training-set collection, delta_scale from val) beat base,
    and did it beat every cheap rival (`RIVALS`, those the task has)?"""
    row = run.ocd(run.TRAIN)
    better, worse, beats_all, lines, rival_lines = [], [], [], [], []
    for name, rs in by_task.items():
        m = metric_of(rs[0])
        if not all(row in r["rows"] for r in rs):
            continue
        get = lambda label, m=m: lambda r: r["rows"][label][m]  # noqa: E731
        p = paired(rs, get(row), get(Row.BASE))
        lines.append(f"- {name}: {paired_verdict(p, m, 'OCD', 'base')}")
        if beyond_noise(p):
            (better if p["mean"] < 0 else worse).append(name)
        rivals = [x for x in RIVALS if all(x in r["rows"] for r in rs)]
        won = []
        for rival in rivals:
            q = paired(rs, get(row), get(rival))
            won.append(beyond_noise(q) and q["mean"] < 0)
            rival_lines.append(f"- {name}: {paired_verdict(q, m, 'OCD', rival)}")
        if rivals and all(won):
            beats_all.append(name)
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
        + [
            "",
            "Against the cheap rivals (temperature scaling, the nearest-neighbour delta, the predicted-label rival "
            "uncalibrated and calibrated; those a task has), the shipped default beats every one beyond noise on "
            f"{len(beats_all)} of {n} tasks ({', '.join(beats_all) or 'none'}):",
            "",
        ]
        + rival_lines
        + [""]
    )


def _head_desc(r: dict) -> str:
    return (
        f"alternative layer = the best other layer of the selection (ranking, top 3: {r['selection']['ranking'][:3]})"
    )


def ideas_table(rs: list[dict], metric: str) -> dict[str, dict]:
    """Per idea present in every seed: OCD and base (mean, SD), OCD − base per seed, extra rows, the knob."""
    labels = [k for k in rs[0]["ideas"] if all(k in r.get("ideas", {}) for r in rs)]
    extra_rows = [Row.ensemble(n) for n in run.ENSEMBLES[1:]] + [Row.OCD_UNCALIBRATED]
    out = {}
    for lab in labels:
        key = run.idea_row(lab)
        ocd = [r["ideas"][lab]["rows"][key][metric] for r in rs]
        base = [r["ideas"][lab]["rows"][Row.BASE][metric] for r in rs]
        extra = {}
        for k in extra_rows:
            if all(k in r["ideas"][lab]["rows"] for r in rs):
                extra[k] = mean_sd([r["ideas"][lab]["rows"][k][metric] for r in rs])
        knob = [r["ideas"][lab].get("delta_scale", r["ideas"][lab].get("tau")) for r in rs]
        out[lab] = {
            "ocd": mean_sd(ocd),
            "base": mean_sd(base),
            "diff": paired(
                rs,
                lambda r, lab=lab, key=key: r["ideas"][lab]["rows"][key][metric],
                lambda r, lab=lab: r["ideas"][lab]["rows"][Row.BASE][metric],
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
        options = {run.DEFAULT_BUDGET: (run.CROSS_FIT, r["rows"].get(run.ocd(run.CROSS_FIT)))}
        for lab in run.BUDGETS:
            idea = r.get("ideas", {}).get(run.budget_idea(lab, run.CROSS_FIT))
            options[lab] = (run.budget_head(lab, run.CROSS_FIT), idea["rows"][Row.OCD] if idea else None)
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
    base = [r["rows"][Row.BASE][metric] for r in rs]
    return {
        "picks": picks,
        "ocd": mean_sd(tests),
        "diff": paired(rs, lambda r: tests[rs.index(r)], lambda r: r["rows"][Row.BASE][metric]),
        "base": mean_sd(base),
    }


def ideas_markdown(name: str, rs: list[dict], metric: str) -> list[str]:
    t = ideas_table(rs, metric)
    md = [
        f"#### {name}: ideas (test {metric}, mean ± SD over {len(rs)} seeds; base {fmt([r['rows'][Row.BASE][metric] for r in rs])})",
        "",
        "| variant | OCD, calibrated (ensembles: the ensemble) | OCD − base (per seed) | uncalibrated (delta_scale 1) | ensemble | delta_scale or τ per seed |",
        "|---|---|---|---|---|---|",
    ]
    for lab, v in t.items():
        d = v["diff"]
        ens = "; ".join(f"{k}: {m:.4f} ± {s:.4f}" for k, (m, s) in v["extra"].items() if k != Row.OCD_UNCALIBRATED)
        unc = v["extra"].get(Row.OCD_UNCALIBRATED)
        md.append(
            f"| {lab} | {v['ocd'][0]:.4f} ± {v['ocd'][1]:.4f} | {d['mean']:+.4f} ± {d['sd']:.4f} (lower in {d['lower_in']}/{d['n']}) | "
            f"{'' if unc is None else f'{unc[0]:.4f} ± {unc[1]:.4f}'} | {ens} | {v['knob']} |"
        )
    ref = {
        k: fmt([r["rows"][k][metric] for r in rs])
        for k in (Row.BASE, Row.ORACLE, Row.NEAREST_NEIGHBOUR)
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


def rules_markdown(by_task: dict[str, list[dict]]) -> list[str]:
    """Calibration rules compared on every head of every run (`run.rule_comparison`): the test gain of the
    value each rule picks on validation, and how often it made test worse than base."""
    if not all(r.get("rules") for rs in by_task.values() for r in rs):
        return []
    heads = (run.TRAIN, run.CROSS_FIT, run.ALTERNATIVE, run.BODY)
    ks = calibration_ks([r for rs in by_task.values() for r in rs])
    # the rule labels the records were saved with (run.RULES at the time), in their order
    names = [*next(iter(by_task.values()))[0]["rules"][run.TRAIN]["rules"], "best on test (hindsight)"]

    def pick(entry: dict, name: str) -> dict:
        return entry["best_on_test"] if name == "best on test (hindsight)" else entry["rules"][name]

    md = [
        "## Calibration rules, every head of every run",
        "",
        "Each rule picks delta_scale from the same validation draws `calibrate` scores (the rule these runs "
        f"calibrated with, {' or '.join(f'{k:g}' for k in ks)} SE, picks the head's delta_scale); the cell is the test gain of that pick over base, in the task's loss "
        "(cross-entropy; squared error for regression), for the train-collection head: mean ± SD over seeds. "
        "In brackets: regressions (test loss above base) / heads, over every head of every seed (train and "
        "cross-fit collection, runner-up layer, body layer). The last row picks the best value on test itself: "
        "a ceiling no rule can pass on this grid, not a method.",
        "",
        "| rule | " + " | ".join(by_task) + " | regressions, all tasks | mean gain, all heads |",
        "|---|" + "---|" * (len(by_task) + 2),
    ]
    for name in names:
        cells, worse, total, gains = [], 0, 0, []
        for rs in by_task.values():
            main = [pick(r["rules"][run.TRAIN], name)["test_gain"] for r in rs if run.TRAIN in r["rules"]]
            entries = [pick(r["rules"][h], name) for r in rs for h in heads if h in r["rules"]]
            bad = sum(e["test_gain"] < 0 for e in entries)
            worse, total = worse + bad, total + len(entries)
            gains += [e["test_gain"] for e in entries]
            m, sd = mean_sd(main) if main else (float("nan"), float("nan"))
            cells.append(f"{m:+.4f} ± {sd:.4f} [{bad}/{len(entries)}]")
        md.append(f"| {name} | " + " | ".join(cells) + f" | {worse}/{total} | {sum(gains) / max(len(gains), 1):+.5f} |")
    return md + [""]


def across_tasks(by_task: dict[str, list[dict]]) -> list[str]:
    """One row per variant, one column per task: OCD − base (mean ± SD over seeds, seeds where OCD is lower)."""
    cols = list(by_task)
    metrics = {t: metric_of(rs[0]) for t, rs in by_task.items()}
    cells: dict[str, dict[str, str]] = {}

    def put(label, task, p):
        cells.setdefault(label, {})[task] = f"{p['mean']:+.4f} ± {p['sd']:.4f} ({p['lower_in']}/{p['n']})"

    variants = (
        (run.ocd_uncalibrated(run.TRAIN), "train collection, uncalibrated (the paper's recipe)"),
        (run.ocd(run.TRAIN), "train collection, delta_scale from val"),
        (run.ocd_ensemble(run.TRAIN, run.NUM_SAMPLES), "train collection, delta_scale from val, x5"),
        (run.ocd_uncalibrated(run.CROSS_FIT), "cross-fit collection, uncalibrated"),
        (run.ocd(run.CROSS_FIT), "cross-fit collection, delta_scale from val"),
        (Row.NEAREST_NEIGHBOUR, "nearest-neighbour delta (train collection)"),
        (Row.PREDICTED_LABEL, "predicted-label rival (no diffusion model), uncalibrated"),
        (Row.PREDICTED_LABEL_CALIBRATED, "predicted-label rival, delta_scale from val"),
        (run.body_row(Row.OCD_UNCALIBRATED), "body-layer head, uncalibrated"),
        (run.body_row(Row.OCD), "body-layer head, delta_scale from val"),
        (Row.TEMPERATURE, "temperature scaling (no OCD)"),
        (Row.KNN, "kNN (no OCD)"),
    )
    for t, rs in by_task.items():
        m = metrics[t]
        base = lambda r, m=m: r["rows"][Row.BASE][m]  # noqa: E731
        for row, label in variants:
            if all(row in r["rows"] for r in rs):
                put(label, t, paired(rs, lambda r, row=row, m=m: r["rows"][row][m], base))
        with_ideas = all("ideas" in r for r in rs)
        for lab, v in (ideas_table(rs, m) if with_ideas else {}).items():
            knob = ", τ from val, delta_scale 1" if run.is_gate_idea(lab) else ", delta_scale from val"
            put(lab + knob, t, v["diff"])
        b = budget_by_validation(rs, m) if with_ideas else None
        if b is not None:
            put("budget chosen on validation (cross-fit collection)", t, b["diff"])
    md = [
        "## Every variant against the base model, across tasks",
        "",
        "OCD − base on each task's test metric ("
        + ", ".join(f"{t}: {metrics[t]}" for t in cols)
        + "), mean ± SD over seeds, "
        "and in how many seeds the variant was lower (better). Negative is better.",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, row in cells.items():
        md.append(f"| {label} | " + " | ".join(row.get(t, "") for t in cols) + " |")
    return md + [""]


def cost_lines(rs: list[dict]) -> list[str]:
    """The predicted-label rival's and OCD's measured cost per test sample, when the runs have it."""
    keys = ("predicted_label_ms_per_sample", "ocd_ms_per_sample")
    if not all(all(k in r.get("extra", {}) for k in keys) for r in rs):
        return []
    rival = [r["extra"][keys[0]] for r in rs]
    ocd = [r["extra"][keys[1]] for r in rs]
    ratio = [o / p for o, p in zip(ocd, rival)]
    return [
        "Cost per test sample, wall time after the shared conditioning pass (`EvaluationReport.extra`): "
        f"predicted-label rival (overfitting steps + one forward) {fmt(rival)} ms; OCD ({run.NUM_SAMPLES} draws "
        f"of the train-collection head + one forward) {fmt(ocd)} ms; ratio OCD / rival {fmt(ratio)}. "
        f"Rival delta_scale chosen on val per seed: {[r['extra'].get('predicted_label_delta_scale') for r in rs]}."
    ]


def sampler_markdown(name: str, rs: list[dict], metric: str) -> list[str]:
    """The sampling-steps ablation of the main head: each DDIM step count and the distilled student, with
    the metric, its share of the 10-step gain over base, the cosine to the oracle and the generation cost."""
    labels = run.sampler_rows(run.TRAIN)
    keep = {row: lab for row, lab in labels.items() if all(lab in r["rows"] for r in rs)}
    if not keep or not all("sampler_ms_per_sample" in r.get("extra", {}) for r in rs):
        return []
    full = run.ocd_steps(run.TRAIN, max(run.FEW_STEPS))
    distilled = [r["distillation"] for r in rs if "distillation" in r]
    student = (
        f"{distilled[0]['num_steps']} steps, a copy of the teacher; held-out MSE to the teacher's samples "
        f"{fmt([d['heldout_mse_before'] for d in distilled])} with the teacher's 1-step sampler, "
        f"{fmt([d['heldout_mse_after'] for d in distilled])} with the student"
        if distilled
        else "none"
    )
    md = [
        f"#### {name}: sampling steps and the distilled student",
        "",
        f"One draw of the train-collection head at its calibrated delta_scale, sampled with each DDIM step "
        f"count, and from its one-pass student (`ocd.distill`: {student}). Share of gain: (base − row) / (base − {max(run.FEW_STEPS)} steps) per seed, shown only where "
        "the 10-step draw beats base in every seed. Cosine: of the unscaled draw to the oracle's delta. "
        "ms: generation per test sample (conditioning and the forward pass excluded), at the evaluation's batch.",
        "",
        f"| sampler | {metric} | share of the {max(run.FEW_STEPS)}-step gain | cosine to oracle | ms / sample |",
        "|---|---|---|---|---|",
    ]
    base = [r["rows"][Row.BASE][metric] for r in rs]
    ten = [r["rows"][full][metric] for r in rs] if all(full in r["rows"] for r in rs) else None
    for row, lab in keep.items():
        vals = [r["rows"][lab][metric] for r in rs]
        share = "—"
        if ten is not None and all(t < b for t, b in zip(ten, base)):  # CE, RMSE: lower is better
            share = fmt([(v - b) / (t - b) for v, b, t in zip(vals, base, ten)])
        cos = [r["cosine"].get(run.cosine_key(run.TRAIN, row)) for r in rs]
        cos_cell = fmt(cos) if None not in cos else "—"
        ms = [r["extra"]["sampler_ms_per_sample"].get(row) for r in rs]
        md.append(
            f"| {lab.removeprefix(run.ocd(run.TRAIN) + ', ')} | {fmt(vals)} | {share} | {cos_cell} | "
            f"{fmt(ms) if None not in ms else '—'} |"
        )
    return md + [""]


def body_markdown(name: str, rs: list[dict], metrics: list[str], table: dict) -> list[str]:
    """The body-layer head's own table (`run.BODY`), when every seed has one; adds its rows to `table`."""
    if not all("body" in r for r in rs):
        return []
    b = rs[0]["body"]
    rows = [row for row in body_table_rows() if all(row in x["rows"] for x in rs)]
    secs = [x["seconds"][run.BODY] + x["body"]["evaluation_seconds"] for x in rs]
    md = [
        f"#### {name}: the body-layer head (`{b['layer']}`, {'x'.join(map(str, b['shape']))}, target {b['target']!r})",
        "",
        "The same base model, train collection and recipe as the main head, on a layer inside the "
        "sentence-transformer body (the paper's kind of SetFit layer) instead of the classifier; its oracle and "
        "rival overfit this layer. Calibrated delta_scale per seed: "
        f"{[x['calibration'][run.BODY]['delta_scale'] for x in rs]}; head, calibration and evaluation "
        f"{fmt(secs)} s per seed." + body_cost(rs),
        "",
        "| method | " + " | ".join(metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for row in rows:
        vals = [x["rows"][row] for x in rs]
        table[row] = {m: mean_sd([v[m] for v in vals]) for m in metrics}
        md.append(f"| {row} | " + " | ".join(fmt([v[m] for v in vals]) for m in metrics) + " |")
    md.append("")
    m = metric_of(rs[0])
    get = lambda row: lambda r: r["rows"][row][m]  # noqa: E731
    verdicts = [
        paired_verdict(paired(rs, get(run.body_row(row)), get(other)), m, run.body_row(row), other)
        for row in (Row.OCD, Row.OCD_UNCALIBRATED)
        for other in (Row.BASE, run.body_row(Row.NEAREST_NEIGHBOUR), run.body_row(Row.MEAN_DELTA))
        if run.body_row(row) in rows and other in rows
    ]
    return md + ["Verdicts (" + m + "):", ""] + [f"- {v}" for v in verdicts] + [""]


def body_cost(rs: list[dict]) -> str:
    """The body-layer evaluation's cost per test sample (rival and OCD), when the runs have it."""
    keys = ("predicted_label_ms_per_sample", "ocd_ms_per_sample")
    if not all(all(k in r["body"]["extra"] for k in keys) for r in rs):
        return ""
    rival, ocd = ([r["body"]["extra"][k] for r in rs] for k in keys)
    return (
        f" Per test sample: predicted-label rival {fmt(rival)} ms, OCD ({run.NUM_SAMPLES} draws + one forward) "
        f"{fmt(ocd)} ms."
    )


def margins_markdown(name: str, rs: list[dict]) -> list[str]:
    """The margin diagnostic per task (`ocd_hf.margins`): change in the true-class margin, by the base
    model's correctness, mean over seeds ± SD over seeds, with the largest per-seed standard error."""
    if not all(r.get("margins") for r in rs):
        return []
    rows = [row for row in margin_rows() if all(row in r["margins"] for r in rs)]
    counts = "; ".join(
        f"seed {r['seed']} {r['margins'][rows[0]][Group.CORRECT]['n']} / {r['margins'][rows[0]][Group.WRONG]['n']}"
        for r in rs
    )

    def base(group: str) -> str:
        vals = [r["margins"][rows[0]][group]["base_margin"] for r in rs]
        return fmt(vals) if None not in vals else "—"

    def cell(row: str, group: str) -> str:
        stats = [r["margins"][row][group] for r in rs]
        if any(s["mean_change"] is None for s in stats):
            return "—"
        m, sd = mean_sd([s["mean_change"] for s in stats])
        ses = [s["se"] for s in stats if s["se"] is not None]
        spread = "" if len(stats) < 2 else f" ± {sd:.4f}"
        return f"{m:+.4f}{spread}" + (f" (SE ≤ {max(ses):.4f})" if ses else "")

    md = [
        f"#### {name}: margin diagnostic",
        "",
        "Change in the true-class margin (the label's logit minus the largest other logit of the model's "
        "outputs) against the base model, on the test samples the base model classifies correctly and on "
        "those it gets wrong; mean over seeds ± SD over seeds, and the largest standard error over samples "
        f"within one seed. Correct / wrong test samples per seed: {counts}. Base margin: correct "
        f"{base(Group.CORRECT)}, wrong {base(Group.WRONG)}. A move toward the base model's own prediction "
        "raises the margin on correct samples and lowers it on wrong ones; only a rise on wrong samples can "
        "flip a prediction.",
        "",
        "| method | Δ margin, base correct | Δ margin, base wrong |",
        "|---|---|---|",
    ]
    for row in rows:
        md.append(f"| {row} | {cell(row, Group.CORRECT)} | {cell(row, Group.WRONG)} |")
    return md + [""]
