"""Full vs factored targets, measured side by side in one run.

1. The digits demo (LeNet fc2, 84x120): cosine of the generated delta to the oracle delta (in full
   weight space: the factored u v̂ᵀ is expanded), OCD cross-entropy / accuracy, rank-one energy kept
   by the collected targets, head training steps/s, OCD inference latency (batch 32, median), head size.
2. A synthetic 4096x4096 Linear: collection and one denoiser training step per target, to show where
   the full target stops on a CPU.

Run (from the project root): python -m benchmarks.factored [--steps 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from ocd_hf import OCDConfig, OCDWrapper
from ocd_hf.capture import Conditioning
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base
from ocd_hf.denoiser import ConditionalUNet1D
from ocd_hf.evaluation import Row, evaluate
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_batch
from ocd_hf.per_sample import factored_to_full
from ocd_hf.state import HeadShapes


def median_time(fn, repeats=5):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def digits(steps: int, seed: int) -> None:
    train, test = load_digits_split(seed)
    torch.manual_seed(seed)
    base = train_base(LeNetDigits(), train, seed=seed)
    xt, yt = test.tensors
    oracle = overfit_batch(base, base.fc2, xt, yt, cross_entropy)
    v = oracle.layer_input / oracle.layer_input.norm(dim=1, keepdim=True)
    print(f"digits LeNet fc2 84x120, {len(train)} train / {len(test)} test, {steps} head steps, seed {seed}")
    print(
        "| target | cos(gen, oracle Δ) | OCD CE | OCD acc | base CE | collected energy kept | train steps/s | latency b32 (ms) | head MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for target in ("full", "factored"):
        torch.manual_seed(seed)
        ocd = OCDWrapper.from_pretrained(base, layer="fc2", target=target)
        with tempfile.TemporaryDirectory() as d:
            store = ocd.collect(train, "cross_entropy", collect_dir=d, progress=False)
            energy = store.column("energy").mean().item() if target == "factored" else 1.0
            t0 = time.perf_counter()
            ocd.train_head(store, num_train_steps=steps, seed=seed, progress=False)
            sps = steps / (time.perf_counter() - t0)
        cond, _ = ocd.conditioning(xt)
        gen = ocd.generate_deltas(cond, 1, torch.Generator().manual_seed(seed))[0]
        if target == "factored":
            gen = factored_to_full(base.fc2, gen, v)
        cos = F.cosine_similarity(gen.flatten(1), oracle.delta.flatten(1)).mean().item()
        rep = evaluate(ocd, test, num_samples=1, seed=seed, progress=False)
        xb = xt[:32]
        lat = median_time(lambda: ocd(xb)) * 1000
        with tempfile.TemporaryDirectory() as d:
            ocd.save_pretrained(os.path.join(d, "h"))
            size = os.path.getsize(os.path.join(d, "h", "ocd_head.safetensors")) / 2**20
        r = rep.rows
        print(
            f"| {target} | {cos:.3f} | {r[Row.OCD]['cross_entropy']:.4f} | {r[Row.OCD]['accuracy']:.4f} | "
            f"{r[Row.BASE]['cross_entropy']:.4f} | {energy:.3f} | {sps:.1f} | {lat:.0f} | {size:.2f} |"
        )


def big_layer() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4))
    x, y = torch.randn(4, 16), torch.randint(0, 4, (4,))
    print("\nsynthetic 4096x4096 Linear, batch of 4 samples")
    for target, opt in (("full", "adam"), ("factored", "adam"), ("factored", "sgd")):
        t = median_time(
            lambda: overfit_batch(
                m, m[2], x, y, cross_entropy, optimizer=opt, lr=0.01 if opt == "sgd" else 5e-4, target=target
            ),
            3,
        )
        # delta, its gradient and Adam's two moments (SGD keeps no state): 4 or 2 tensors per sample
        n_tensors = 4 if opt == "adam" else 2
        per_sample = 4096 * 4096 if (target == "full" or opt == "adam") else 4096
        mib = 4 * per_sample * 4 * n_tensors / 2**20
        print(f"collection {target:8s} {opt}: {t * 1000:.0f} ms / 4 samples; delta-side tensors ≈ {mib:.3f} MiB")
    for target, shape in (("full", (4096, 4096)), ("factored", (4096, 1))):
        cfg = OCDConfig(layer="2", target=target)
        shapes = HeadShapes(
            weight_shape=(4096, 4096), target_shape=shape, input_dim=4096, activation_dim=4096, output_dim=4
        )
        d = ConditionalUNet1D(cfg, shapes)
        c = Conditioning(torch.randn(2, 4096), torch.randn(2, 4096), torch.randn(2, 4))
        omega = torch.randn(2, *shape)

        def step():
            d(omega, torch.tensor([5, 500]), c).pow(2).mean().backward()

        t = median_time(step, 1 if target == "full" else 3)
        params = sum(p.numel() for p in d.parameters()) / 1e6
        print(f"denoiser {target:8s}: one training step at batch 2 = {t:.2f} s; {params:.1f}M parameters")


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.factored", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    digits(args.steps, args.seed)
    if not args.skip_big:
        big_layer()


if __name__ == "__main__":
    main()
