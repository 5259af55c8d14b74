"""Full vs factored targets, measured side by side in one run.

1. The digits demo (LeNet fc2, 84x120): cosine of the generated delta to the oracle delta (in full
   weight space: the factored u v̂ᵀ is expanded), OCD cross-entropy / accuracy, rank-one energy kept
   by the collected targets, head training steps/s, OCD inference latency (batch 32, median), head size.
2. The docs' 4096x4096 example (an MLP, layer "2", 64 random samples): collection time, peak RSS
   growth (each variant in its own process) and cosine to the full-Adam oracle, for factored SGD, the
   default rank-one Adam and full Adam then projected (chunked to 3 GiB); and a whole default `fit`.

Run (from the project root): python -m benchmarks.factored [--steps 1000] [--seed 0] [--threads 1] [--skip-digits] [--big-samples 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ocd_hf import OCDConfig, OCDWrapper
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base
from ocd_hf.evaluation import Row, evaluate
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_batch
from ocd_hf.per_sample import factored_to_full


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


def big_model(samples: int, seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    """The docs' example: an MLP with a 4096x4096 hidden layer ("2") and `samples` random inputs."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4))
    g = torch.Generator().manual_seed(seed + 1)
    return m, TensorDataset(torch.randn(samples, 16, generator=g), torch.randint(0, 4, (samples,), generator=g))


# variant -> (overfit settings, overfit_batch method, max_memory); "fit" runs OCDWrapper.fit with defaults
BIG_VARIANTS = {
    "factored, SGD (lr 0.01)": (dict(optimizer="sgd", lr=0.01), None, None),
    "factored, Adam, rank-one (default)": ({}, None, None),
    "factored, Adam on the full delta, projected (max_memory 3GiB)": ({}, "full", "3GiB"),
}


def big_child(variant: str, samples: int, out_dir: str) -> None:
    """One variant in a fresh process, so that ru_maxrss is its own peak; prints a JSON line."""
    from ocd_hf.collection import collect_deltas
    from ocd_hf.integrations import TorchAdapter
    from ocd_hf.overfit import OverfitSettings

    m, data = big_model(samples)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "fit":
        ocd = OCDWrapper.from_pretrained(m, layer="2", config=OCDConfig(target="factored"))
        ocd.fit(data, loss="cross_entropy", num_train_steps=20, progress=False, collect_dir=out_dir)
        ocd(data.tensors[0][:2])
    else:
        kw, method, max_memory = BIG_VARIANTS[variant]
        a = TorchAdapter(m)
        settings = OverfitSettings(target="factored", **kw)
        if method is not None:  # the planner (and so every chunk) uses this method instead of its choice
            import ocd_hf.memory as memory

            memory.overfit_method = lambda *args, **kwargs: method
        collect_deltas(
            m,
            "2",
            data,
            cross_entropy,
            out_dir,
            settings,
            split_batch=a.split_batch,
            forward_fn=a.forward,
            batch_size=64,
            max_memory=max_memory,
            progress=False,
        )
    seconds = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"variant": variant, "seconds": seconds, "peak_rss_growth": grown}))


def big_layer(samples: int, threads: int | None) -> None:
    """Collection on the 4096x4096 layer: time, peak RSS and cosine to the full-Adam oracle, per variant."""
    print(f"\nsynthetic 4096x4096 Linear (docs/factored.md example), {samples} samples, collection batch 64")
    print("| variant | collection time (s) | peak RSS growth (GiB) | cos(u, full-Adam u) min / mean | energy kept |")
    print("|---|---|---|---|---|")
    results, stores = {}, {}
    with tempfile.TemporaryDirectory() as root:
        for i, variant in enumerate([*BIG_VARIANTS, "fit"]):
            out_dir = os.path.join(root, str(i))
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.factored",
                "--big-child",
                variant,
                "--big-samples",
                str(samples),
                "--out",
                out_dir,
            ]
            if threads:
                cmd += ["--threads", str(threads)]
            res = subprocess.run(
                cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1]
            )
            results[variant] = json.loads(res.stdout.strip().splitlines()[-1])
            from ocd_hf.collection import DeltaStore

            stores[variant] = DeltaStore(out_dir).get_batch(range(samples))
        oracle = stores["factored, Adam on the full delta, projected (max_memory 3GiB)"]["delta"]
        for variant, r in results.items():
            u = stores[variant]["delta"]
            cos = F.cosine_similarity(u, oracle)
            energy = stores[variant]["energy"].mean().item()
            name = "OCDWrapper.fit, default config, 20 head steps (whole run)" if variant == "fit" else variant
            print(
                f"| {name} | {r['seconds']:.1f} | {r['peak_rss_growth'] / 2**30:.2f} | "
                f"{cos.min():.6f} / {cos.mean():.6f} | {energy:.3f} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.factored", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--big-samples", type=int, default=64)
    p.add_argument("--big-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.big_child:
        big_child(args.big_child, args.big_samples, args.out)
        return
    if not args.skip_digits:
        digits(args.steps, args.seed)
    if not args.skip_big:
        big_layer(args.big_samples, args.threads)


if __name__ == "__main__":
    main()
