"""Which `prediction_type` should the denoiser default to? Trains the digits demo head once per type
and seed and prints held-out CE, accuracy, cosine to the oracle delta and the std of sampled Ω_0
(healthy ≈ 1: the targets have unit std by construction).

Run (from the project root): python -m benchmarks.prediction_type [--steps 1500] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ocd_hf import OCDWrapper
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base
from ocd_hf.evaluation import Cosine, Row, evaluate


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.prediction_type",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--types", nargs="+", default=["epsilon", "sample", "v_prediction"])
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 avoids oversubscription on a busy machine)"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    for kind in args.types:
        res = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            train, test = load_digits_split(seed)
            model = train_base(LeNetDigits(), train, seed=seed)
            ocd = OCDWrapper.from_pretrained(model, layer="fc2", prediction_type=kind)
            t0 = time.perf_counter()
            ocd.fit(train, loss="cross_entropy", num_train_steps=args.steps, seed=seed, progress=False)
            rep = evaluate(ocd, test, num_samples=5, seed=seed, progress=False)
            x = torch.stack([test[i][0] for i in range(256)])
            cond, _ = ocd.conditioning(x)
            omega = ocd.generate_deltas(cond, 1, torch.Generator().manual_seed(seed)) / ocd.head.scale_net(
                ocd.head.normalize(cond)
            ).view(1, -1, 1, 1)
            res.append(
                (
                    rep.rows[Row.BASE]["cross_entropy"],
                    rep.rows[Row.OCD]["cross_entropy"],
                    rep.rows[Row.OCD]["accuracy"],
                    rep.cosine_to_oracle[Cosine.OCD],
                    omega.std().item(),
                    time.perf_counter() - t0,
                )
            )
            print(kind, seed, [f"{v:.4f}" for v in res[-1]], flush=True)
        rows[kind] = res
    print(f"\n{args.steps} steps, seeds {args.seeds}; mean ± SD")
    print("| prediction_type | base CE | OCD CE | OCD acc | cosine to oracle | sampled Ω std | s/run |")
    print("|---|---|---|---|---|---|---|")
    for kind, res in rows.items():
        cols = list(zip(*res))
        f = lambda c: f"{statistics.mean(c):.4f} ± {statistics.stdev(c) if len(c) > 1 else 0:.4f}"  # noqa: E731
        print(f"| {kind} | " + " | ".join(f(c) for c in cols[:5]) + f" | {statistics.mean(cols[5]):.0f} |")


if __name__ == "__main__":
    main()
