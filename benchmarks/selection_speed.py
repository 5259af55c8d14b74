"""How long does layer="auto" take? Eq. 6 selection on the digits LeNet (ocd_hf.demo) with K perturbations.

Trains LeNetDigits with `train_base` on `load_digits_split(0)` (timed separately), then scores every
candidate layer on the first N training samples and prints the report (time per candidate in the last
column) and the total. Several K values and seeds can be given to compare rankings: `--perturbations 10000 1000 --seeds 0 1 2`.

Run (from the project root): python -m benchmarks.selection_speed [--perturbations 10000] [--samples 32] [--plot scores.png]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ocd_hf import select_layer
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base


def _load() -> str:
    """1-minute load average: timings on a shared machine mean little without it."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.selection_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--perturbations", type=int, nargs="+", default=[10_000], help="K values to run")
    p.add_argument("--samples", type=int, default=32, help="fixed samples N")
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="selection seeds (perturbation draws)")
    p.add_argument("--epochs", type=int, default=30, help="base model training epochs (train_base default)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--plot", default=None, help="write the bar chart of the first run here (PNG)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    train, _ = load_digits_split(0)
    torch.manual_seed(0)  # LeNetDigits' initialisation (train_base seeds only the training)
    model = train_base(LeNetDigits(), train, epochs=args.epochs, seed=0)
    print(
        f"base model: {args.epochs} epochs on {len(train)} digits in {time.perf_counter() - t0:.1f}s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {_load()}"
    )
    x, y = train.tensors[0][: args.samples], train.tensors[1][: args.samples]
    runs = [(k, seed) for k in args.perturbations for seed in args.seeds]
    for i, (k, seed) in enumerate(runs):
        report = select_layer(model, (x, y), loss="cross_entropy", num_perturbations=k, sigma=args.sigma, seed=seed)
        if i == 0:
            print()
            print(report.to_markdown())
            if args.plot:
                print(f"plot: {report.plot(args.plot)}")
            print()
        per = ", ".join(f"{s.name} {s.seconds:.1f}s" for s in sorted(report.scores, key=lambda s: s.order))
        ranking = " > ".join(f"{s.name} ({s.score:.1f})" for s in report.scores)
        print(
            f"K={k:,} N={report.num_samples} seed={seed}: total {report.seconds:.1f}s ({per}); load {_load()}\n    {ranking}"
        )


if __name__ == "__main__":
    main()
