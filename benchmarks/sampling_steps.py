"""How many denoiser passes does OCD need? DDIM steps vs a distilled one-pass student, and what each
inference change buys, on the digits demo setting (LeNet on scikit-learn digits, layer fc2) or on
Fashion-MNIST (LeNet5, layer fc2; `--task fashion`).

Per seed: train the base model (digits: the demo's training split, the last 200 training images held
out, as in `make demo`; fashion: `benchmarks.tasks`' fashion_lenet5 recipe and split, of which
`--fashion-train` images are collected and `--fashion-test` test images scored), collect deltas, train
the head, then on the held-out images report, for 1, 2, 3, 5 and 10 DDIM steps and for each distilled
student (`ocd.distill`; `--students`: "teacher", the default, a copy of the teacher; "half" a student
of half its width; or widths such as 16,16,32): cross-entropy, accuracy, cosine of one draw to the oracle delta (3 Adam steps on the test
label) and generation ms per sample. Heads are uncalibrated (delta_scale 1), so the rows compare the
samplers and nothing else. "share of gain" is the row's CE gain over the base model divided by the
10-step teacher's. The students of one seed learn from the same teacher bank (sampled once).

A second table ("inference engineering") times the denoiser loop with one change at a time, interleaved:
no_grad vs inference_mode, the condition embedding recomputed every step vs cached, the diffusers DDIM
step vs nothing (its Python overhead), S draws in one batch vs one call per draw.

With --cache-dir, base model, collection and heads are kept there and reused by a rerun with the same
arguments. Threads are pinned (--threads, default 1).

Run: python -m benchmarks.sampling_steps [--seeds 0 1 2] [--head-steps 1000] [--distill-steps 400]
     python -m benchmarks.sampling_steps --task fashion --seeds 0 1 2 --head-steps 500 --no-engineering
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


def fashion_data(seed: int, args: Any) -> tuple[TensorDataset, TensorDataset, Any]:
    """(train, test, base-model trainer) of the fashion_lenet5 task, cut to the sizes asked for."""
    from .data import tensors_of
    from .tasks import build_task

    task = build_task("fashion_lenet5", seed, data_root=args.data_root, quick=args.quick)
    n, m = (96, 64) if args.quick else (args.fashion_train, args.fashion_test)
    train = TensorDataset(*(t[:n] for t in tensors_of(task.train)))
    test = TensorDataset(*(t[:m] for t in tensors_of(task.test)))
    return train, test, task.model


def prepare(
    seed: int, head_steps: int, cache: Path, quick: bool, args: Any
) -> tuple[OCDWrapper, DeltaStore, TensorDataset]:
    """Base model, collection and trained head for one seed (reused from `cache` when there)."""
    torch.manual_seed(seed)
    folder = (
        cache
        / f"{'' if args.task == 'digits' else args.task + '-'}seed{seed}-head{head_steps}{'-quick' if quick else ''}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    if args.task == "fashion":
        train, test, model = fashion_data(seed, args)  # the recipe is seeded: the same base model every time
        model.eval()
    else:
        full_train, test = load_digits_split(seed)
        x, y = full_train.tensors
        train = TensorDataset(x[:-200], y[:-200])
        if quick:
            train, test = (
                TensorDataset(*(t[:96] for t in train.tensors)),
                TensorDataset(*(t[:64] for t in test.tensors)),
            )
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


def use_student(ocd: OCDWrapper, student: tuple[Any, dict]) -> None:
    """Put one of the distilled students (module, record) on the head."""
    ocd.head.student, ocd.state.distillation = student
    ocd.config = ocd.config.replace(sampler="distilled")


def sampler_rows(
    ocd: OCDWrapper, test: TensorDataset, seed: int, repeats: int, batch: int, students: dict[str, tuple]
) -> dict[str, dict]:
    """One row per DDIM step count and one per distilled student."""
    x, y = test.tensors
    oracle = overfit_batch(ocd.module, ocd.layer, x, y, cross_entropy).delta
    base = torch.nn.functional.cross_entropy(ocd.module(x), y).item()
    base_acc = (ocd.module(x).argmax(-1) == y).float().mean().item()
    configs: dict[str, Any] = {f"DDIM {k}": ocd.config.replace(num_inference_steps=k, sampler="ddim") for k in STEPS}
    configs.update(students)
    keep = ocd.config
    nan = float("nan")
    rows: dict[str, dict] = {
        "base": {"ce": base, "acc": base_acc, "cos": nan, "spread": nan, "diversity": nan, "ce_x5": base, "ms": 0.0}
    }
    cond_b, _ = ocd.conditioning(x[:batch])
    gens = {}

    def use(cfg: Any) -> None:
        if isinstance(cfg, tuple):
            use_student(ocd, cfg)
        else:
            ocd.config = cfg

    for name, cfg in configs.items():
        use(cfg)
        rows[name] = score(ocd, x, y, oracle, seed)

        def gen(cfg=cfg):
            use(cfg)
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


def latency(ocd: OCDWrapper, x: torch.Tensor, repeats: int, students: dict[str, tuple]) -> dict[str, float]:
    """Median seconds of the base model and of `ocd(x)` with each sampler, interleaved."""
    ddim = ocd.config.replace(sampler="ddim")

    def run(cfg: Any) -> None:
        if isinstance(cfg, tuple):
            use_student(ocd, cfg)
        else:
            ocd.config = cfg
        ocd(x, generator=torch.Generator().manual_seed(0))

    fns = {"base": lambda: ocd.module(x), "OCD, DDIM 10": lambda: run(ddim)}
    for name, student in students.items():
        fns[f"OCD, {name}"] = lambda student=student: run(student)
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
    p.add_argument("--task", choices=["digits", "fashion"], default="digits")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--fashion-train", type=int, default=2000, help="fashion: training images collected")
    p.add_argument("--fashion-test", type=int, default=1000, help="fashion: test images scored")
    p.add_argument(
        "--students", nargs="+", default=["teacher", "half"], help="distill's student_channels, one row each"
    )
    p.add_argument("--no-engineering", action="store_true", help="skip the inference-engineering timings")
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
            ocd, store, test = prepare(seed, args.head_steps, cache, args.quick, args)
            students, seed_records = {}, {}
            with shared_teacher_bank():
                for choice in args.students:
                    t0 = time.perf_counter()
                    record = ocd.distill(
                        store, student_channels=parse_channels(choice), seed=seed, progress=False, **distill_kwargs
                    )
                    record["seconds"] = time.perf_counter() - t0
                    name = student_row(choice, record)
                    students[name], seed_records[name] = (ocd.head.student, record), record
                    print(f"seed {seed}: {name} distilled in {record['seconds']:.0f}s ({record})", flush=True)
            records.append(seed_records)
            rows = sampler_rows(ocd, test, seed, args.repeats, args.batch, students)
            per_seed.append(rows)
            for name, r in rows.items():
                print(f"  seed {seed} | {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
            if not latencies:  # timings on the first seed's head only
                x = test.tensors[0]
                if not args.no_engineering:
                    engineering_rows = engineering(ocd, x[: args.batch], args.repeats, args.draws)
                for b in (1, args.batch):
                    latencies[b] = latency(ocd, x[:b], args.repeats, students)
    print(report(args, per_seed, records, engineering_rows, latencies))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


def parse_channels(choice: str) -> str | tuple[int, ...]:
    """--students item: "teacher", "half", or widths like "16,16,32"."""
    return choice if choice in ("teacher", "half") else tuple(int(c) for c in choice.split(","))


def student_row(choice: str, record: dict) -> str:
    """Row name of a student: "distilled" for the default one, else its size."""
    if choice == "teacher":
        return "distilled"
    return f"distilled, {record['student_channels']}"


@contextlib.contextmanager
def shared_teacher_bank():
    """Within the block, `distill` samples the teacher once per head and seed: every student of a seed
    learns from the same bank (the generator is left where a fresh sampling would leave it)."""
    from ocd_hf import distillation

    original, banks = distillation.teacher_bank, {}

    def cached(head, config, cond, num_draws, generator, **kw):
        key = (
            id(head),
            num_draws,
            tuple(cond.layer_input.shape),
            float(cond.layer_input.sum()),
            generator.initial_seed(),
        )
        if key not in banks:
            banks[key] = (original(head, config, cond, num_draws, generator, **kw), generator.get_state())
        bank, state = banks[key]
        generator.set_state(state)
        return bank

    distillation.teacher_bank = cached
    try:
        yield
    finally:
        distillation.teacher_bank = original


def report(args: Any, per_seed: list[dict], records: list[dict], eng: list | None, latencies: dict) -> str:
    seeds = " ".join(str(s) for s in args.seeds)
    cmd = f"python -m benchmarks.sampling_steps --task {args.task} --seeds {seeds} --head-steps {args.head_steps}"
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
        passes = "0" if name == "base" else "1" if name.startswith("distilled") else name.split()[-1]
        speed = "–" if name == "base" else mean_sd([rows["DDIM 10"]["ms"] / rows[name]["ms"] for rows in per_seed], 1)
        lines.append(
            f"| {name} | {passes} | {mean_sd(col('ce'))} | {mean_sd(gain)} | {share} | {mean_sd(col('acc'))} | "
            f"{mean_sd(col('cos'))} | {cshare} | {mean_sd(col('spread'), 2)} | "
            f"{mean_sd(col('diversity'), 2)} | {mean_sd(col('ce_x5'))} | {mean_sd(col('ms'), 1)} | {speed} |"
        )
    lines.append("")
    for name in records[0]:
        rs = [seed_records[name] for seed_records in records]
        r = rs[0]
        lines.append(
            f"Distillation, {name}: {r['method']} student, channels {r['student_channels'] or 'as the teacher'}, "
            f"{r['num_steps']} steps, {r['num_inputs']} conditioning vectors × {r['num_draws']} teacher samples; "
            f"{mean_sd([x['seconds'] for x in rs], 0)} s (the first student of a seed includes sampling the teacher); "
            f"held-out MSE to the teacher's samples {mean_sd([x['heldout_mse_before'] for x in rs])} (untrained student) "
            f"-> {mean_sd([x['heldout_mse_after'] for x in rs])}."
        )
    if eng:
        lines += [
            "",
            f"Inference engineering (seed {args.seeds[0]}, batch {args.batch}, 10 DDIM steps; medians of "
            f"{args.repeats} interleaved repeats):",
            "",
            "| change | before ms | after ms | speed-up |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n} | {1000 * a:.1f} | {1000 * b:.1f} | {a / b:.2f}x |" for n, a, b in eng]
    lines += ["", "Latency of `ocd(x)` (one draw) against the base model (ms, and / base):", ""]
    names = [k for k in next(iter(latencies.values())) if k != "base"]
    lines += ["| batch | base ms | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for b, t in latencies.items():
        cells = [f"{1000 * t[k]:.1f} ({t[k] / t['base']:.1f}x)" for k in names]
        lines.append(f"| {b} | {1000 * t['base']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
