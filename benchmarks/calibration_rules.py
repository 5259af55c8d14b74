"""Which rule should choose `delta_scale`? Calibration rules compared on the digits demo setting.

Per seed (each seed its own split, base model, collection and head): train the base model on the demo's
training split less its last 200 images (held out for validation, as in `make demo`), collect deltas on
`fc2`, train the head for --head-steps steps, then score one draw per sample at every value of the
default grid on validation and on the held-out test digits (`ocd_hf.calibration.grid_losses`). Each rule
(`ocd_hf.calibration.choose_scale`) picks a value on validation; the table reports, over seeds, the test
cross-entropy gain over the base model at that value (mean ± SD), the number of seeds where it made test CE
worse than base (regressions), and the chosen values. The predicted-label rival (3 Adam steps toward the
base model's argmax, `ocd_hf.evaluation.predicted_label_deltas`) is scored the same way.

Rules: "best" (lowest validation loss, no guard), "se2" (the shipped rule: best, kept if its gain exceeds
2 SE), "se1", "shrink1"/"shrink2" (every value's gain shrunk by 1/2 SE, largest kept if positive), and
"se2, grid <= 2" (the shipped rule on the grid before it was extended).

Run: python -m benchmarks.calibration_rules [--seeds 0 1 2] [--head-steps 300]
     python -m benchmarks.calibration_rules --quick   (tiny head and data, seconds: a smoke test)
Threads are pinned (--threads, default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ocd_hf import OCDTrainingArguments, OCDWrapper
from ocd_hf.calibration import DEFAULT_GRID, choose_scale, grid_losses
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base
from ocd_hf.evaluation import Row, evaluate, predicted_label_deltas
from ocd_hf.losses import cross_entropy
from ocd_hf.trainer import OCDTrainer

QUICK_HEAD = dict(block_out_channels=(16, 16, 32), cond_hidden_dim=16, scale_hidden_dim=16)
# name -> (rule, k, largest grid value allowed)
RULES: dict[str, tuple[str, float, float]] = {
    "best (no guard)": ("se", float("-inf"), float("inf")),
    "se2 (default)": ("se", 2.0, float("inf")),
    "se1": ("se", 1.0, float("inf")),
    "shrink1": ("shrinkage", 1.0, float("inf")),
    "shrink2": ("shrinkage", 2.0, float("inf")),
    "se2, grid <= 2": ("se", 2.0, 2.0),
}


EVAL_ROWS = (
    Row.BASE,
    Row.TEMPERATURE,
    Row.ORACLE,
    Row.OCD,
    Row.OCD_UNCALIBRATED,
    Row.PREDICTED_LABEL,
    Row.PREDICTED_LABEL_CALIBRATED,
)


def run_seed(seed: int, head_steps: int, quick: bool) -> dict[str, Any]:
    """Per-sample validation and test losses at every grid value, for OCD and the predicted-label rival."""
    torch.manual_seed(seed)
    full_train, test = load_digits_split(seed)
    x, y = full_train.tensors
    train, val = TensorDataset(x[:-200], y[:-200]), TensorDataset(x[-200:], y[-200:])
    if quick:
        train, val, test = (TensorDataset(*(t[:n] for t in d.tensors)) for d, n in ((train, 96), (val, 48), (test, 48)))
    t0 = time.perf_counter()
    model = train_base(LeNetDigits(), train, epochs=3 if quick else 30, seed=seed)
    ocd = OCDWrapper.from_pretrained(model, layer="fc2", **(QUICK_HEAD if quick else {}))
    args = OCDTrainingArguments(
        num_train_steps=head_steps, seed=seed, progress=False, **({"train_batch_size": 16} if quick else {})
    )
    trainer = OCDTrainer(ocd, args, loss="cross_entropy")
    with tempfile.TemporaryDirectory() as folder:
        trainer.train_head(trainer.collect(train, folder))
    result: dict[str, Any] = {"seed": seed, "head_s": time.perf_counter() - t0}
    for name, split in (("val", val), ("test", test)):
        gen = torch.Generator().manual_seed(seed)
        fns = {
            "ocd": lambda inputs, cond, base_out, gen=gen: ocd.generate_deltas(cond, 1, gen, delta_scale=1.0)[0],
            "rival": lambda inputs, cond, base_out: predicted_label_deltas(ocd, inputs, base_out),
        }
        for method, fn in fns.items():
            result[f"{method}_{name}"] = grid_losses(ocd, split, cross_entropy, DEFAULT_GRID, fn, progress=False)
    # the evaluation's own rows, with the shipped calibration (the same draws as the grid above)
    trainer.calibrate(val)
    t0 = time.perf_counter()
    report = evaluate(ocd, test, num_samples=1, seed=seed, validation=val, progress=False)
    result["evaluate_s"] = time.perf_counter() - t0
    result["rows"] = {k: v["cross_entropy"] for k, v in report.rows.items() if k in EVAL_ROWS}
    result["accuracy"] = {k: v["accuracy"] for k, v in report.rows.items() if k in EVAL_ROWS}
    result["extra"] = {k: v for k, v in report.extra.items() if not isinstance(v, dict)}
    result["cosine"] = report.cosine_to_oracle
    return result


def compare(runs: list[dict[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    """For each rule: the test CE gain over base at its validation choice, per seed, and the regressions."""
    table = {}
    uncalibrated = [float(r[f"{method}_test"][0.0].mean() - r[f"{method}_test"][1.0].mean()) for r in runs]
    for name, (rule, k, top) in RULES.items():
        gains, chosen = [], []
        for r in runs:
            val = {g: v for g, v in r[f"{method}_val"].items() if g <= top}
            scale = choose_scale(val, rule=rule, min_gain_se=k)["delta_scale"]
            test = r[f"{method}_test"]
            gains.append(float(test[0.0].mean() - test[scale].mean()))
            chosen.append(scale)
        table[name] = {
            "gain_mean": statistics.mean(gains),
            "gain_sd": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "regressions": sum(g < 0 for g in gains),
            "chosen": chosen,
            "gains": gains,
        }
    table["uncalibrated (delta_scale 1)"] = {
        "gain_mean": statistics.mean(uncalibrated),
        "gain_sd": statistics.stdev(uncalibrated) if len(uncalibrated) > 1 else 0.0,
        "regressions": sum(g < 0 for g in uncalibrated),
        "chosen": [1.0] * len(runs),
        "gains": uncalibrated,
    }
    return table


def markdown(table: dict[str, dict[str, Any]], base_ce: list[float]) -> str:
    lines = [
        "| rule | test CE gain over base (mean ± SD) | regressions | delta_scale chosen per seed |",
        "|---|---|---|---|",
    ]
    for name, t in table.items():
        chosen = ", ".join(f"{c:g}" for c in t["chosen"])
        lines.append(f"| {name} | {t['gain_mean']:+.4f} ± {t['gain_sd']:.4f} | {t['regressions']} | {chosen} |")
    lines.append(f"\nBase test CE per seed: {', '.join(f'{c:.4f}' for c in base_ce)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--head-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny head, data and steps: a smoke test")
    p.add_argument("--json", default=None, help="also write the tables here")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    torch.set_num_threads(a.threads)
    steps = 5 if a.quick else a.head_steps
    runs = []
    with warnings.catch_warnings():
        # short heads warn about their sample spread and uncalibrated use; the table is what is measured
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        for s in a.seeds:
            runs.append(run_seed(s, steps, a.quick))
            print(f"seed {s}: base, collection and head ({steps} steps) in {runs[-1]['head_s']:.0f}s", flush=True)
    base_ce = [float(r["ocd_test"][0.0].mean()) for r in runs]
    out = {"seeds": a.seeds, "head_steps": steps, "grid": list(DEFAULT_GRID), "base_test_ce": base_ce}
    for method, title in (("ocd", "OCD (1 draw)"), ("rival", "predicted-label rival")):
        out[method] = compare(runs, method)
        print(f"\n{title}, digits, layer fc2, seeds {a.seeds}, head {steps} steps:\n")
        print(markdown(out[method], base_ce))
    print(f"\nevaluate() on the test digits (cross-entropy, accuracy; one draw; seeds {a.seeds}):\n")
    print("| row | " + " | ".join(f"seed {s}" for s in a.seeds) + " |")
    print("|---|" + "---|" * len(runs))
    for row in EVAL_ROWS:
        if all(row in r["rows"] for r in runs):
            cells = " | ".join(f"{r['rows'][row]:.4f} ({r['accuracy'][row]:.3f})" for r in runs)
            print(f"| {row} | {cells} |")
    for key in ("delta_scale", "predicted_label_delta_scale", "predicted_label_ms_per_sample", "ocd_ms_per_sample"):
        print(f"- {key}: " + ", ".join(f"{r['extra'].get(key, float('nan')):.4g}" for r in runs))
    for key in runs[0]["cosine"]:
        print(f"- cosine to the oracle, {key}: " + ", ".join(f"{r['cosine'][key]:.3f}" for r in runs))
    out["evaluate"] = [{k: r[k] for k in ("rows", "accuracy", "extra", "cosine", "evaluate_s")} for r in runs]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
