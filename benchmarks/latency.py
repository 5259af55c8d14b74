"""Sections 2 and 3 of `benchmarks.speed`: batched vs one-by-one OCD calls, and OCD vs base latency, for
each way of drawing Ω₀, timed side by side in one run.

Samplers (`SAMPLERS`): the 10-step DDIM teacher (a freshly fitted head), the shipped default
`ocd.distill(data)` (a student of the teacher's size) and the faster `distill(data, student_channels="half")`
(half the teacher's width). The students are distilled for a couple of steps only: a pass costs the same
whatever the weights, so latency does not depend on it.

Goals, checked on the shipped default: OCD / base <= 20x on LeNet5 at batch 64, 32
one-by-one calls / one call on a batch of 32 >= 10x; and OCD / base <= 2x for SetFit at batch 32.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

DDIM, DEFAULT, HALF = "DDIM 10 steps", "distilled (default)", "distilled, half width"
COMPILED = "distilled (default), torch.compile"  # `ocd.head.compile()`; left out of --quick (compiling takes a minute)
SAMPLERS = (DDIM, DEFAULT, HALF, COMPILED)
GOAL_BATCHED_SPEEDUP = 10.0
GOAL_SETFIT_RATIO = 2.0
GOAL_LENET5_RATIO = 20.0
# student training for the timings only (see the module docstring)
TIMING_DISTILL = dict(num_steps=2, max_inputs=64, num_draws=2, batch_size=16, progress=False)


def add_samplers(ocd: Any, store: Any, compiled: bool = True) -> dict[str, Callable[[], None]]:
    """Distil both students on `store`; returns sampler name -> a function that switches `ocd` to it
    (`compiled`: also the default student through `torch.compile`)."""
    ocd.distill(store, student_channels="half", **TIMING_DISTILL)
    half = (ocd.head.student, ocd.state.distillation)
    ocd.distill(store, **TIMING_DISTILL)
    default = (ocd.head.student, ocd.state.distillation)

    ocd.head.compile()  # options only: each network compiles on its first compiled call, then is reused

    def ddim() -> None:
        ocd.config = ocd.config.replace(sampler="ddim")
        ocd.head.compile_options = None

    def student(which: tuple[Any, dict], compile_it: bool = False) -> Callable[[], None]:
        def use() -> None:
            ocd.head.student, ocd.state.distillation = which
            ocd.config = ocd.config.replace(sampler="distilled")
            ocd.head.compile_options = {} if compile_it else None

        return use

    out = {DDIM: ddim, DEFAULT: student(default), HALF: student(half)}
    if compiled:
        out[COMPILED] = student(default, compile_it=True)
    return out


def goal_for(key: str, sampler: str, batch: int) -> tuple[str | None, Callable[[float], bool] | None]:
    """(goal text, test) of an OCD / base ratio, or (None, None) where no goal is set."""
    if key == "lenet5" and sampler == DEFAULT and batch == 64:
        return f"<= {GOAL_LENET5_RATIO:g}x", lambda r: r <= GOAL_LENET5_RATIO
    if key == "setfit" and batch == 32:
        return f"<= {GOAL_SETFIT_RATIO:g}x", lambda r: r <= GOAL_SETFIT_RATIO
    return None, None


def bench_inference(
    rec: Any,
    key: str,
    task: dict[str, Any],
    ocd: Any,
    samplers: dict[str, Callable[[], None]],
    args: argparse.Namespace,
    measure_group: Callable[..., dict[str, list[float]]],
    paper_batch1: float,
) -> None:
    """Time base and OCD at every batch size and one-by-one, for every sampler, interleaved in one group."""
    label, adapter, module = task["label"], ocd.adapter, ocd.module
    inputs = task["inputs"]
    batches = sorted(b for b in args.batches if b > 1 and b <= len(inputs))
    one_by_one = min(args.batch, len(inputs))
    prepare = adapter.prepare_inputs if key == "setfit" else (lambda v: v)
    singles = [inputs[i : i + 1] for i in range(one_by_one)]
    module.eval()

    @torch.no_grad()
    def base(v: Any) -> torch.Tensor:
        return adapter.forward(module, prepare(v))

    def ocd_call(name: str, v: Any) -> torch.Tensor:
        samplers[name]()
        return ocd(prepare(v), num_samples=1)

    if COMPILED in samplers:  # compile outside the timings: batch 1, then each batch size
        t0 = time.perf_counter()
        for v in [singles[0]] + [inputs[:b] for b in batches]:
            ocd_call(COMPILED, v)
        rec.row("compile", label, "first compiled calls, every batch size", [time.perf_counter() - t0])

    fns: dict[str, Callable[[], Any]] = {"base 1": lambda: [base(v) for v in singles]}
    for b in batches:
        fns[f"base {b}"] = lambda b=b: base(inputs[:b])
    for name in samplers:
        fns[f"{name} 1"] = lambda name=name: [ocd_call(name, v) for v in singles]
        for b in batches:
            fns[f"{name} {b}"] = lambda name=name, b=b: ocd_call(name, inputs[:b])
    if key == "setfit":  # SetFit's own path (encode, then scikit-learn): a second reference for "base"
        fns["setfit"] = lambda: task["model"].predict_proba(inputs[: args.batch])
    times = measure_group(fns, args.repeats)

    base_s = {
        1: rec.row("inference", label, f"base, {one_by_one} one-by-one calls", times["base 1"], per=one_by_one, batch=1)
    }
    for b in batches:
        base_s[b] = rec.row("inference", label, f"base, batch {b}", times[f"base {b}"], batch=b)
    if key == "setfit":
        rec.row("inference", label, f"SetFitModel.predict_proba, batch {args.batch}", times["setfit"], batch=args.batch)
    for name in samplers:
        ocd_s = {
            1: rec.row(
                "inference",
                label,
                f"OCD ({name}), {one_by_one} one-by-one calls",
                times[f"{name} 1"],
                per=one_by_one,
                batch=1,
                sampler=name,
            )
        }
        for b in batches:
            ocd_s[b] = rec.row(
                "inference", label, f"OCD ({name}), batch {b}", times[f"{name} {b}"], batch=b, sampler=name
            )
        if one_by_one in ocd_s and one_by_one > 1:
            r = ocd_s[1] * one_by_one / ocd_s[one_by_one]
            goal = name == DEFAULT
            rec.compare(
                "batched",
                label,
                f"{one_by_one} one-by-one OCD calls / one call on a batch of {one_by_one}",
                r,
                f">= {GOAL_BATCHED_SPEEDUP:g}x" if goal else None,
                (r >= GOAL_BATCHED_SPEEDUP) if goal else None,
                batch=one_by_one,
                sampler=name,
            )
        for b, t in ocd_s.items():
            r = t / base_s[b]
            goal, test = goal_for(key, name, b)
            rec.compare(
                "latency",
                label,
                f"OCD ({name}) / base, batch {b}",
                r,
                goal,
                test(r) if test else None,
                batch=b,
                base_s=base_s[b],
                ocd_s=t,
                key=key,
                sampler=name,
                paper_gpu_batch1=paper_batch1 if b == 1 else None,
            )

    # ---- where the default's time goes: unmodified forward for I(x), sampling + scale net, forward with W + Δ
    samplers[DEFAULT]()
    for v, bb in ((inputs[: max(batches, default=1)], max(batches, default=1)), (singles[0], 1)):
        feats = prepare(v)
        cond, _ = ocd.conditioning(feats)
        delta = ocd.generate_deltas(cond)[0]
        parts = {
            "tokenize / prepare inputs": lambda v=v: prepare(v),
            "conditioning forward": lambda feats=feats: ocd.conditioning(feats),
            "sampling + scale net": lambda cond=cond: ocd.generate_deltas(cond),
            "forward with W + delta": lambda feats=feats, delta=delta: ocd.forward_with_deltas(feats, delta),
        }
        for part, t in measure_group(parts, args.repeats).items():
            rec.row("breakdown", label, f"{part}, batch {bb}", t, batch=bb, sampler=DEFAULT)


def latency_markdown(meta: dict[str, Any], rec: Any, goal_cell: Callable[[dict], str], table: Callable) -> list[str]:
    """Sections 2 and 3 of speed.md."""
    rows, comps = rec.rows, rec.comparisons
    ms = lambda s: f"{s * 1e3:.0f}" if s >= 0.1 else f"{s * 1e3:.2f}" if s >= 1e-3 else f"{s * 1e3:.3f}"  # noqa: E731
    out = [
        "",
        "### 2. Batched OCD inference",
        "",
        "One call on a batch against as many one-by-one calls, per sampler; the goal is for the shipped default "
        "(`fit`, then `distill`).",
        "",
        table(
            ["task", "sampler", "comparison", "ratio", "goal", "goal met"],
            [
                [c["task"], c["sampler"], c["name"], f"{c['ratio']:.1f}x", c["goal"] or "—", goal_cell(c)]
                for c in comps
                if c["section"] == "batched"
            ],
        ),
        "",
        "### 3. OCD vs base latency",
        "",
        "`ocd(x, num_samples=1)`: an unmodified forward for I(x), Ω₀ from the sampler, a forward with W + Δ (the "
        "layers before L reused from the first pass). Samplers: the 10-step DDIM teacher; the shipped default, "
        "`distill(data)`, a student of the teacher's size; `distill(data, student_channels='half')`, a student "
        "of half the teacher's width; the default student through `torch.compile` (`ocd.head.compile()`, "
        "compiled before the timings; its compile time is under the table). Batch 1 = the median of "
        f"{meta['inference_batch']} one-by-one calls, divided by their number. SetFit takes raw strings, "
        "tokenized inside each timed call, for base and OCD alike. The paper's ratios are on a GPU, with DDIM.",
        "",
    ]
    lat = []
    for c in (c for c in comps if c["section"] == "latency"):
        paper = f"{c['paper_gpu_batch1']:g}x" if c.get("paper_gpu_batch1") else "—"
        lat.append(
            [
                c["task"],
                c["sampler"],
                str(c["batch"]),
                ms(c["base_s"]),
                ms(c["ocd_s"]),
                f"{c['ratio']:.1f}x",
                paper,
                c["goal"] or "—",
                goal_cell(c),
            ]
        )
    out.append(
        table(
            [
                "task",
                "sampler",
                "batch",
                "base (ms)",
                "OCD (ms)",
                "OCD / base",
                "paper, GPU (Tab. 8)",
                "goal",
                "goal met",
            ],
            lat,
        )
    )
    compiled = [r for r in rows if r["section"] == "compile"]
    if compiled:
        out += [
            "",
            "Compiling the default student (`ocd.head.compile()`; the first calls at batch 1 and at each batch size "
            "above): " + ", ".join(f"{r['task']} {r['median_s']:.0f} s" for r in compiled) + ".",
        ]
    extra = [r for r in rows if r["section"] == "inference" and "predict_proba" in r["name"]]
    if extra:
        out += [
            "",
            "For reference, SetFit's own `predict_proba` (encode, then scikit-learn) on the same batch: "
            + ", ".join(f"{ms(r['median_s'])} ms ({r['name']})" for r in extra)
            + ".",
        ]
    brk = [r for r in rows if r["section"] == "breakdown"]
    out += [
        "",
        "Where the shipped default's time goes (ms; each part timed alone, so the parts do not add up to a call):",
        "",
    ]
    cells = []
    for task in dict.fromkeys(r["task"] for r in brk):
        for bb in sorted({r["batch"] for r in brk if r["task"] == task}, reverse=True):
            parts = [r for r in brk if r["task"] == task and r["batch"] == bb]
            cells.append([task, str(bb)] + [ms(r["median_s"]) for r in parts])
    out.append(
        table(
            ["task", "batch", "prepare inputs", "conditioning forward", "sampling + scale net", "forward with W + Δ"],
            cells,
        )
    )
    return out


# ---------------------------------------------------------------------------------------------- op timings
def op_timings(repeats: int = 21, batch: int = 64) -> list[tuple[str, str, float, float]]:
    """(change, tensor, ms before, ms after) for each inference change, on the tensors of a LeNet5 fc2 head
    (Ω₀ of 84×120 per sample; the U-Net's first-block activations, 32 channels × 84), timed interleaved."""
    import copy
    import statistics
    import time

    from ocd_hf.config import OCDConfig
    from ocd_hf.denoiser import FastMish
    from ocd_hf.health import all_finite
    from ocd_hf.sampling import _sampling_scheduler, make_sampling_scheduler

    g = torch.Generator().manual_seed(0)
    omega = torch.randn(batch, 84, 120, generator=g)
    act = torch.randn(batch, 32, 84, generator=g)
    config = OCDConfig()
    sched = make_sampling_scheduler(config)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    fast = FastMish()
    key = (config.num_train_timesteps, config.beta_schedule, config.prediction_type)
    pairs = [
        (
            "Mish: torch's kernel -> FastMish",
            f"{tuple(act.shape)}",
            lambda: torch.nn.functional.mish(act),
            lambda: fast(act),
        ),
        (
            "finite check: isfinite().all() -> all_finite (aminmax)",
            f"{tuple(omega.shape)}",
            lambda: bool(torch.isfinite(omega).all()),
            lambda: all_finite(omega),
        ),
        (
            "last x0 step: DDIMScheduler.step -> the prediction itself",
            f"{tuple(omega.shape)}",
            lambda: sched.step(omega, t, omega, eta=0.0).prev_sample,
            lambda: omega,
        ),
        (
            "result: copy out of inference_mode -> none (no_grad)",
            f"{tuple(omega.shape)}",
            lambda: omega.clone(),
            lambda: omega,
        ),
        (
            "sampling scheduler: built per call -> cached, shallow copy",
            "–",
            lambda: _sampling_scheduler.__wrapped__(*key),
            lambda: copy.copy(_sampling_scheduler(*key)),
        ),
    ]
    out = []
    with torch.no_grad():
        for name, shape, before, after in pairs:
            times: dict[str, list[float]] = {"a": [], "b": []}
            before(), after()
            for r in range(repeats):
                for k, fn in (("a", before), ("b", after)) if r % 2 == 0 else (("b", after), ("a", before)):
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            out.append((name, shape, statistics.median(times["a"]) * 1e3, statistics.median(times["b"]) * 1e3))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.latency [--threads 1] [--repeats 21]`: the op timings table (markdown)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=main.__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| change | tensor | before ms | after ms | speed-up |\n|---|---|---|---|---|")
    for name, shape, a, b in op_timings(args.repeats):
        gain = f"{a / b:.1f}x" if b >= 0.005 else "(no work left)"
        print(f"| {name} | {shape} | {a:.3f} | {b:.3f} | {gain} |")


if __name__ == "__main__":
    main()
