"""How many denoiser passes does OCD need? DDIM steps vs a distilled one-pass student, and what each
inference change buys, on the digits demo setting (LeNet on scikit-learn digits, layer fc2).

Per seed: train the base model on the demo's training split (the last 200 training images held out, as in
`make demo`), collect deltas, train the head, then on the held-out digits report, for 1, 2, 3, 5 and 10
DDIM steps and for the distilled student (`ocd.distill`): cross-entropy, accuracy, cosine of one draw to
the oracle delta (3 Adam steps on the test label) and generation ms per sample. Heads are uncalibrated
(delta_scale 1), so the rows compare the samplers and nothing else. "share of gain" is the row's CE gain
over the base model divided by the 10-step teacher's.

A second table ("inference engineering") times the denoiser loop with one change at a time, interleaved:
no_grad vs inference_mode, the condition embedding recomputed every step vs cached, the diffusers DDIM
step vs nothing (its Python overhead), S draws in one batch vs one call per draw.

With --cache-dir, base model, collection and heads are kept there and reused by a rerun with the same
arguments. Threads are pinned (--threads, default 1).

Run: python -m benchmarks.sampling_steps [--seeds 0 1 2] [--head-steps 1000] [--distill-steps 400]
     python -m benchmarks.sampling_steps --quick   (tiny head, a few seconds: a smoke test)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from ocd_hf import OCDTrainingArguments, OCDWrapper
from ocd_hf.capture import Conditioning
from ocd_hf.collection import DeltaStore
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base
from ocd_hf.ensemble import combine_draws
from ocd_hf.losses import cross_entropy
from ocd_hf.modes import eval_mode
from ocd_hf.overfit import overfit_batch
from ocd_hf.prefix import reuse_prefix
from ocd_hf.sampling import make_sampling_scheduler
from ocd_hf.trainer import OCDTrainer

QUICK_HEAD = dict(block_out_channels=(16, 16, 32), cond_hidden_dim=16, scale_hidden_dim=16)


def prepare(seed: int, head_steps: int, cache: Path, quick: bool) -> tuple[OCDWrapper, DeltaStore, TensorDataset]:
    """Base model, collection and trained head for one seed (reused from `cache` when there)."""
    torch.manual_seed(seed)
    full_train, test = load_digits_split(seed)
    x, y = full_train.tensors
    train = TensorDataset(x[:-200], y[:-200])
    if quick:
        train, test = TensorDataset(*(t[:96] for t in train.tensors)), TensorDataset(*(t[:64] for t in test.tensors))
    folder = cache / f"seed{seed}-head{head_steps}{'-quick' if quick else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    model = LeNetDigits()
    if (folder / "base.safetensors").exists():
        model.load_state_dict(load_file(str(folder / "base.safetensors")))
        model.eval()
    else:
        train_base(model, train, epochs=3 if quick else 30, seed=seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "base.safetensors"))
    config = QUICK_HEAD if quick else {}
    args = OCDTrainingArguments(
        num_train_steps=head_steps,
        seed=seed,
        progress=False,
        collect_dir=str(folder / "collect"),
        **({"train_batch_size": 16} if quick else {}),
    )
    if (folder / "head" / "ocd_head.safetensors").exists():
        ocd = OCDWrapper.from_pretrained(model, folder / "head")
        trainer = OCDTrainer(ocd, args, loss="cross_entropy")
        store = trainer.collect(train)
    else:
        ocd = OCDWrapper.from_pretrained(model, layer="fc2", **config)
        trainer = OCDTrainer(ocd, args, loss="cross_entropy")
        store = trainer.collect(train)
        t0 = time.perf_counter()
        trainer.train_head(store)
        print(f"  seed {seed}: head trained ({head_steps} steps) in {time.perf_counter() - t0:.0f}s", flush=True)
        ocd.save_pretrained(folder / "head")
    return ocd, store, test


# ---------------------------------------------------------------------------------------------- quality
STEPS = (1, 2, 3, 5, 10)


def measure_group(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median wall time of each function, timed interleaved (one warm-up call each)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def score(ocd: OCDWrapper, x: torch.Tensor, y: torch.Tensor, oracle: torch.Tensor, seed: int) -> dict[str, float]:
    """Uncalibrated draws with the config's sampler: CE and accuracy of one draw, its mean cosine to the
    oracle, the spread of the sampled Ω_0 against the targets', how much of the deltas' spread is
    draw-to-draw (std over the 5 draws of one input / overall std) and CE of a 5-draw probability ensemble."""
    cond, _ = ocd.conditioning(x)
    deltas = ocd.generate_deltas(cond, 5, torch.Generator().manual_seed(seed), delta_scale=1.0)
    outs = torch.stack([ocd.forward_with_deltas(x, d) for d in deltas])
    cos = torch.nn.functional.cosine_similarity(deltas[0].flatten(1).double(), oracle.flatten(1).double(), dim=1)
    return {
        "ce": torch.nn.functional.cross_entropy(outs[0], y).item(),
        "acc": (outs[0].argmax(-1) == y).float().mean().item(),
        "cos": cos.mean().item(),
        "spread": ocd.last_health.ratio,
        "diversity": (deltas.std(0).mean() / deltas.std()).item(),
        "ce_x5": torch.nn.functional.nll_loss(combine_draws(outs, "classification"), y).item(),
    }


def sampler_rows(ocd: OCDWrapper, test: TensorDataset, seed: int, repeats: int, batch: int) -> dict[str, dict]:
    """One row per DDIM step count (and the distilled student when the head has one)."""
    x, y = test.tensors
    oracle = overfit_batch(ocd.module, ocd.layer, x, y, cross_entropy).delta
    base = torch.nn.functional.cross_entropy(ocd.module(x), y).item()
    base_acc = (ocd.module(x).argmax(-1) == y).float().mean().item()
    configs = {f"DDIM {k}": ocd.config.replace(num_inference_steps=k, sampler="ddim") for k in STEPS}
    if ocd.head.student is not None:
        configs["distilled"] = ocd.config.replace(sampler="distilled")
    keep = ocd.config
    nan = float("nan")
    rows: dict[str, dict] = {
        "base": {"ce": base, "acc": base_acc, "cos": nan, "spread": nan, "diversity": nan, "ce_x5": base, "ms": 0.0}
    }
    cond_b, _ = ocd.conditioning(x[:batch])
    gens = {}
    for name, cfg in configs.items():
        ocd.config = cfg
        rows[name] = score(ocd, x, y, oracle, seed)

        def gen(cfg=cfg):
            ocd.config = cfg
            ocd.generate_deltas(cond_b, 1, torch.Generator().manual_seed(0))

        gens[name] = gen
    times = measure_group(gens, repeats)
    ocd.config = keep
    for name, t in times.items():
        rows[name]["ms"] = 1000 * t / len(cond_b.layer_input)
    return rows


# ---------------------------------------------------------------------------------------------- engineering
def engineering(ocd: OCDWrapper, x: torch.Tensor, repeats: int, draws: int) -> list[tuple[str, float, float]]:
    """(change, ms before, ms after) per change, each timed interleaved with what it changes."""
    head, cfg = ocd.head, ocd.config.replace(sampler="ddim")
    den = head.denoiser
    cond, _ = ocd.conditioning(x)
    normed = head.normalize(cond)
    sched = make_sampling_scheduler(cfg)
    b, shape, steps = len(x), den.weight_shape, cfg.num_inference_steps

    def loop(mode: Any, cache: bool, s: int = 1, update: str = "scheduler") -> torch.Tensor:
        # the DDIM loop by hand; mode=torch.no_grad, cache=False is sample_omega as it was before
        z = torch.randn((s * b, *shape), generator=torch.Generator().manual_seed(0))
        rep = Conditioning(*(c.repeat(s, 1) for c in normed))
        sched.set_timesteps(steps)
        with mode(), eval_mode(den), den.condition_cache() if cache else contextlib.nullcontext():
            for t in sched.timesteps:
                pred = den(z, t, rep)
                if update == "scheduler":
                    z = sched.step(pred, t, z, eta=0.0).prev_sample
                else:  # the same eta=0 x0-prediction update, without the scheduler's bookkeeping
                    a_t = sched.alphas_cumprod[t]
                    prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
                    a_p = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
                    eps = (z - a_t.sqrt() * pred) / (1 - a_t).sqrt()
                    z = a_p.sqrt() * pred + (1 - a_p).sqrt() * eps
        return z

    out: list[tuple[str, float, float]] = []
    t = measure_group(
        {"a": lambda: loop(torch.no_grad, False), "b": lambda: loop(torch.inference_mode, False)}, repeats
    )
    out.append(("torch.inference_mode instead of no_grad", t["a"], t["b"]))
    t = measure_group(
        {"a": lambda: loop(torch.inference_mode, False), "b": lambda: loop(torch.inference_mode, True)}, repeats
    )
    out.append(("condition embedding once per call, not per step", t["a"], t["b"]))
    t = measure_group(
        {
            "a": lambda: loop(torch.inference_mode, True),
            "b": lambda: loop(torch.inference_mode, True, update="by hand"),
        },
        repeats,
    )
    out.append(("diffusers DDIMScheduler.step vs the same update by hand", t["a"], t["b"]))
    t = measure_group(
        {
            "a": lambda: [loop(torch.inference_mode, True) for _ in range(draws)],
            "b": lambda: loop(torch.inference_mode, True, s=draws),
        },
        repeats,
    )
    out.append((f"{draws} draws: one denoiser batch instead of {draws} loops", t["a"], t["b"]))
    deltas = ocd.generate_deltas(cond, draws, torch.Generator().manual_seed(0))
    xs = x.repeat(draws, *([1] * (x.dim() - 1)))

    def looped() -> None:
        with reuse_prefix(ocd.module, ocd.layer, True):
            ocd.conditioning(x)
            [ocd.forward_with_deltas(x, d) for d in deltas]

    def batched() -> None:
        ocd.conditioning(x)
        ocd.forward_with_deltas(xs, deltas.flatten(0, 1))

    t = measure_group({"a": looped, "b": batched}, repeats)
    out.append(
        (f"{draws} draws: model passes batched (inputs repeated) instead of looped (prefix reused)", t["a"], t["b"])
    )
    return out


def latency(ocd: OCDWrapper, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of the base model and of `ocd(x)` with each sampler, interleaved."""
    ddim, dist = ocd.config.replace(sampler="ddim"), ocd.config.replace(sampler="distilled")

    def run(cfg: Any) -> None:
        ocd.config = cfg
        ocd(x, generator=torch.Generator().manual_seed(0))

    fns = {"base": lambda: ocd.module(x), "OCD, DDIM 10": lambda: run(ddim)}
    if ocd.head.student is not None:
        fns["OCD, distilled"] = lambda: run(dist)
    keep = ocd.config
    with torch.no_grad():
        t = measure_group(fns, repeats)
    ocd.config = keep
    return t


# ---------------------------------------------------------------------------------------------- report
def mean_sd(values: list[float], digits: int = 4) -> str:
    if any(v != v for v in values):
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--head-steps", type=int, default=1000)
    p.add_argument("--distill-steps", type=int, default=None, help="default: ocd.distill's")
    p.add_argument("--distill-lr", type=float, default=None, help="default: ocd.distill's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="batch of the timings")
    p.add_argument("--draws", type=int, default=5, help="ensemble size in the engineering table")
    p.add_argument("--cache-dir", default=None, help="keep base models, collections and heads here")
    p.add_argument("--quick", action="store_true", help="tiny head, few steps: a smoke test (< 1 min)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sampled deltas have std")  # the spread is a column instead
    warnings.filterwarnings("ignore", message="fit\\(\\) without eval_dataset")
    if args.quick:
        args.head_steps, args.repeats, args.batch, args.draws = 20, 1, 16, 2
        args.distill_steps = args.distill_steps or 5
    distill_kwargs = {k: v for k, v in (("num_steps", args.distill_steps), ("learning_rate", args.distill_lr)) if v}
    if args.quick:
        distill_kwargs.update(batch_size=16, num_draws=2)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir or tmp)
        per_seed, records, engineering_rows, latencies = [], [], None, {}
        for seed in args.seeds:
            ocd, store, test = prepare(seed, args.head_steps, cache, args.quick)
            t0 = time.perf_counter()
            record = ocd.distill(store, seed=seed, progress=False, **distill_kwargs)
            record["seconds"] = time.perf_counter() - t0
            records.append(record)
            print(f"seed {seed}: distilled in {record['seconds']:.0f}s ({record})", flush=True)
            rows = sampler_rows(ocd, test, seed, args.repeats, args.batch)
            per_seed.append(rows)
            for name, r in rows.items():
                print(f"  seed {seed} | {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
            if engineering_rows is None:  # timings on the first seed's head only
                x = test.tensors[0]
                engineering_rows = engineering(ocd, x[: args.batch], args.repeats, args.draws)
                for b in (1, args.batch):
                    latencies[b] = latency(ocd, x[:b], args.repeats)
    print(report(args, per_seed, records, engineering_rows, latencies))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


def report(args: Any, per_seed: list[dict], records: list[dict], eng: list, latencies: dict) -> str:
    seeds = " ".join(str(s) for s in args.seeds)
    cmd = f"python -m benchmarks.sampling_steps --seeds {seeds} --head-steps {args.head_steps}"
    lines = [
        f"`{cmd}{' --quick' if args.quick else ''}` (threads {args.threads}; {len(per_seed)} seed(s), mean ± SD)",
        "",
        "| sampler | denoiser passes / draw | CE | gain over base | share of the 10-step gain | accuracy "
        "| cosine to oracle Δ | share of the 10-step cosine | Ω₀ spread / targets' | draw-to-draw share of the spread "
        "| CE, 5-draw ensemble | generation ms / sample | speed-up vs 10 steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ten_gain = statistics.mean(rows["base"]["ce"] - rows["DDIM 10"]["ce"] for rows in per_seed)
    ten_cos = statistics.mean(rows["DDIM 10"]["cos"] for rows in per_seed)
    for name in per_seed[0]:
        col = lambda k: [rows[name][k] for rows in per_seed]  # noqa: E731
        gain = [rows["base"]["ce"] - rows[name]["ce"] for rows in per_seed]
        # shares are ratios of the means over seeds: one seed's gain can be ~0 or negative
        share = f"{statistics.mean(gain) / ten_gain:.2f}" if name != "base" and ten_gain else "–"
        cshare = f"{statistics.mean(col('cos')) / ten_cos:.2f}" if name != "base" and ten_cos else "–"
        passes = {"base": "0", "distilled": "1"}.get(name, name.split()[-1])
        speed = "–" if name == "base" else mean_sd([rows["DDIM 10"]["ms"] / rows[name]["ms"] for rows in per_seed], 1)
        lines.append(
            f"| {name} | {passes} | {mean_sd(col('ce'))} | {mean_sd(gain)} | {share} | {mean_sd(col('acc'))} | "
            f"{mean_sd(col('cos'))} | {cshare} | {mean_sd(col('spread'), 2)} | "
            f"{mean_sd(col('diversity'), 2)} | {mean_sd(col('ce_x5'))} | {mean_sd(col('ms'), 1)} | {speed} |"
        )
    r = records[0]
    lines += [
        "",
        f"Distillation: {r['method']} student, {r['num_steps']} steps, {r['num_inputs']} conditioning vectors × "
        f"{r['num_draws']} teacher samples; {mean_sd([x['seconds'] for x in records], 0)} s; held-out MSE to the "
        f"teacher's samples {mean_sd([x['heldout_mse_before'] for x in records])} (1-step teacher) -> "
        f"{mean_sd([x['heldout_mse_after'] for x in records])} (student).",
        "",
        f"Inference engineering (seed {args.seeds[0]}, batch {args.batch}, 10 DDIM steps; medians of "
        f"{args.repeats} interleaved repeats):",
        "",
        "| change | before ms | after ms | speed-up |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {1000 * a:.1f} | {1000 * b:.1f} | {a / b:.2f}x |" for n, a, b in eng]
    lines += ["", "Latency of `ocd(x)` (one draw) against the base model:", ""]
    lines += ["| batch | base ms | OCD, DDIM 10 ms (/base) | OCD, distilled ms (/base) |", "|---|---|---|---|"]
    for b, t in latencies.items():
        d = t.get("OCD, distilled", float("nan"))
        lines.append(
            f"| {b} | {1000 * t['base']:.2f} | {1000 * t['OCD, DDIM 10']:.1f} ({t['OCD, DDIM 10'] / t['base']:.0f}x) "
            f"| {1000 * d:.1f} ({d / t['base']:.0f}x) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
