"""Collection speed on the demo model (digits LeNet, layer fc2), measured side by side in one run.

Prints medians over repeats of:
- the official code's way (deepcopy the model per sample, 3 Adam steps) vs vectorized collection,
- vectorized collection vs one epoch of ordinary base-model training on the same data
  (the floor is ~3 forward+backward passes per sample, so ≈3x is the best possible).

Run: python benchmarks/overfit_speed.py [--repeats 5] [--sequential-samples 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

from ocd_hf.collection import collect_deltas
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base
from ocd_hf.integrations import ModelAdapter
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_sequential


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sequential-samples", type=int, default=200, help="samples timed for the slow loop (per-sample cost is constant)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    args = p.parse_args()
    torch.manual_seed(0)
    train, _ = load_digits_split(0)
    model = train_base(LeNetDigits(), train, epochs=5)
    x, y = train.tensors
    n = len(train)
    adapter = ModelAdapter(model)

    def sequential():
        overfit_sequential(model, "fc2", x[: args.sequential_samples], y[: args.sequential_samples], cross_entropy)

    def vectorized(bs):
        with tempfile.TemporaryDirectory() as d:
            collect_deltas(model, "fc2", train, cross_entropy, d, split_batch=adapter.split_batch,
                           forward_fn=adapter.forward, batch_size=bs, progress=False)

    def base_epoch():
        m = LeNetDigits()
        opt = torch.optim.Adam(m.parameters(), lr=2e-3)
        for xb, yb in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()

    seq = timed(sequential, max(1, args.repeats // 2)) / args.sequential_samples * n
    epoch = timed(base_epoch, args.repeats)
    print(f"digits LeNet, layer fc2 (84x120), {n} samples, 3 Adam steps, torch threads={torch.get_num_threads()}")
    print(f"sequential deepcopy loop (extrapolated from {args.sequential_samples} samples): {seq:.2f} s")
    print(f"one epoch of base training (batch 64): {epoch:.3f} s")
    for bs in args.batch_sizes:
        vec = timed(lambda: vectorized(bs), args.repeats)
        print(f"vectorized collection, batch {bs}: {vec:.3f} s  ->  speed-up over sequential {seq / vec:.1f}x, "
              f"collection / base epoch {vec / epoch:.2f}x")


if __name__ == "__main__":
    main()
