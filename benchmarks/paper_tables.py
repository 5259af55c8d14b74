"""The paper's tables on offline stand-ins, 3 seeds, with every ablation, a skeptic's baselines and the
ideas of "make OCD actually help" (held-out collection, overfit budget, guidance, gating, ensembles).

    python -m benchmarks.paper_tables                      # 4 tasks x 3 seeds -> docs/results/paper_tables.{json,md}
    python -m benchmarks.paper_tables --quick --out-dir /tmp/x   # a smoke test (tiny sizes)
    python -m benchmarks.paper_tables --jobs 2             # runs (task, seed) pairs in 2 processes

Run from the project root. Each (task, seed) run is saved to <runs-dir>/<task>-seed<seed>.json (default
build/bench-runs) as soon as it finishes and is skipped when present, so an interrupted run resumes
(--force reruns); the tables are rebuilt from the saved runs of the requested tasks and seeds. What a run
does: benchmarks/run.py; the tables: benchmarks/tables.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

import torch

from .run import RunSettings, run_one
from .tables import COMMAND, aggregate, atomic_write
from .tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
# the slowest tasks first, so that parallel workers finish together
SLOWNESS = {"setfit_8shot": 3, "fashion_lenet5": 2, "digits": 1, "california_mlp": 0}


def run_path(runs_dir: str | Path, task: str, seed: int) -> Path:
    return Path(runs_dir) / f"{task}-seed{seed}.json"


def run_and_save(job: tuple[str, int, RunSettings, str]) -> tuple[str, int, str | None]:
    """Run one (task, seed) and save its record; returns (task, seed, the error's traceback or None)."""
    name, seed, settings, runs_dir = job
    try:
        rec = run_one(name, seed, settings)
    except Exception as e:  # one failed run must not lose the others; the failure is reported at the end
        return name, seed, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    atomic_write(run_path(runs_dir, name, seed), json.dumps(rec, indent=1))
    return name, seed, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.paper_tables",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.data_root).is_dir():
        sys.exit(
            f"--data-root {args.data_root} is not a folder (it needs vision/, tabular/ and text/ from ../shared/data)."
        )
    settings = RunSettings(
        data_root=args.data_root,
        quick=args.quick,
        threads=args.threads,
        perturbations=args.perturbations,
        head_steps=args.head_steps,
        ideas=not args.no_ideas,
        all_layers_oracle=not args.no_all_layers_oracle,
    )
    order = sorted(args.tasks, key=lambda t: -SLOWNESS.get(t, 0))
    runs_dir = Path(args.runs_dir)
    jobs = [
        (t, s, settings, args.runs_dir)
        for t in order
        for s in args.seeds
        if args.force or not run_path(runs_dir, t, s).exists()
    ]
    t0 = time.perf_counter()
    failures = []

    def report(name: str, seed: int, err: str | None) -> None:
        print(f"{name} seed {seed}: {'FAILED' if err else 'done'} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if err:
            failures.append((name, seed, err))

    if args.jobs > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for result in pool.imap_unordered(run_and_save, jobs):
                report(*result)
    else:
        for job in jobs:
            report(*run_and_save(job))
    runs = [
        json.loads(run_path(runs_dir, t, s).read_text())
        for t, s in sorted((t, s) for t in args.tasks for s in args.seeds)
        if run_path(runs_dir, t, s).exists()
    ]
    summary, md = aggregate(runs)
    meta = {
        "command": f"{COMMAND} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "threads": args.threads,
        "quick": args.quick,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out_dir)
    atomic_write(out / "paper_tables.json", json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    atomic_write(out / "paper_tables.md", md)
    print(md)
    for name, seed, err in failures:
        print(f"\n{name} seed {seed} failed:\n{err}", file=sys.stderr)
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
