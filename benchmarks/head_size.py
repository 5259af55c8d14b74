"""Head training steps per second: the fixed pre-sizing head vs the auto-sized default.

For each target shape, builds both heads and times one full training step (denoiser + scale net forward,
backward, AdamW step) on random deltas and conditioning, alternating the two heads step by step so that
machine load hits both alike. Prints the median ms per step, steps/s and the ratio, and the median
generation time per sample (10 DDIM steps, batch of `--batch` conditioning vectors, one draw each),
timed the same way.

Shapes: the demo's layer (LeNetDigits fc2, weight 84x120), a 16x32 layer and a 4096-wide factored target
(4096x1). Threads are pinned (--threads, default 1).

Run: python -m benchmarks.head_size [--steps 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ocd_hf.capture import Conditioning
from ocd_hf.config import OCDConfig, resolve_sizes
from ocd_hf.head import OCDHead
from ocd_hf.state import HeadShapes

FIXED = dict(block_out_channels=(64, 64, 128), cond_hidden_dim=128, scale_hidden_dim=128)
SHAPES = {
    "demo fc2 84x120": HeadShapes((84, 120), (84, 120), 120, 84, 10),
    "16x32": HeadShapes((16, 32), (16, 32), 32, 16, 10),
    "factored 4096x1": HeadShapes((4096, 4096), (4096, 1), 4096, 4096, 10),
}


def step_fn(head: OCDHead, shapes: HeadShapes, batch: int):
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shapes.target_shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    cond = Conditioning(
        torch.randn(batch, shapes.input_dim, generator=g),
        torch.randn(batch, shapes.activation_dim, generator=g),
        torch.randn(batch, shapes.output_dim, generator=g),
    )
    scale = torch.rand(batch, generator=g) + 0.5

    def step() -> float:
        t0 = time.perf_counter()
        pred, rho = head(x, t, cond)
        loss = F.mse_loss(pred, x) + (rho - scale).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def generate() -> float:
        t0 = time.perf_counter()
        head.generate(cond, config)
        return time.perf_counter() - t0

    config = OCDConfig(num_inference_steps=10)
    return step, generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        "| target | head | channels | parameters | train ms / step | steps/s | training speed-up "
        "| generate ms / sample | generation speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.shapes:
        shapes = SHAPES[name]
        configs = {"fixed (before)": OCDConfig(**FIXED), "auto (now)": OCDConfig()}
        heads = {k: OCDHead(c, shapes) for k, c in configs.items()}
        fns = {k: step_fn(h, shapes, a.batch) for k, h in heads.items()}
        times: dict[str, list[float]] = {k: [] for k in heads}
        gen: dict[str, list[float]] = {k: [] for k in heads}
        for k in heads:  # warm-up
            fns[k][0]()
            fns[k][1]()
        for _ in range(a.steps):
            for k in heads:
                times[k].append(fns[k][0]())
        for _ in range(max(3, a.steps // 4)):
            for k in heads:
                gen[k].append(fns[k][1]() / a.batch)
        med = {k: statistics.median(v) for k, v in times.items()}
        gmed = {k: statistics.median(v) for k, v in gen.items()}
        for k, h in heads.items():
            c = resolve_sizes(configs[k], shapes.target_shape)
            n = sum(p.numel() for p in h.parameters())
            ratio = med["fixed (before)"] / med[k]
            gratio = gmed["fixed (before)"] / gmed[k]
            print(
                f"| {name} | {k} | {list(c.block_out_channels)} | {n:,} | {1e3 * med[k]:.1f} | {1 / med[k]:.1f} | "
                f"{ratio:.2f}x | {1e3 * gmed[k]:.2f} | {gratio:.2f}x |"
            )


if __name__ == "__main__":
    main()
