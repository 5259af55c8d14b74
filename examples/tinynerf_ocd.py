"""OCD on TinyNeRF: per-view weights for the first layer of a NeRF, on three procedurally rendered scenes.

    python examples/tinynerf_ocd.py --quick            # 8x8 images, seconds
    python examples/tinynerf_ocd.py --figure docs/examples/tinynerf.png   # 32x32 images, minutes

Renders ground-truth views of three synthetic scenes (spheres, boxes, textured planes; Lambert + Phong
shading) offline, trains a TinyNeRF per scene, overfits `layer1` on every training view (one view = one
OCD sample: its rays in, its image out, MSE), trains the head, calibrates delta_scale on validation views
and scores held-out test views: base, oracle, OCD, OCD x5 and the rivals. The head is conditioned as in the
official code: i_L and a_L pooled with the volume-rendering weights, f an EfficientNet-Lite0 encoding of the
base model's rendering (`benchmarks.task_nerf.NeRFConditioner`, an `ocd_hf.Conditioner`); `--conditioning mean`
uses the core's mean pooling. The task's code is
`benchmarks/task_nerf.py`; docs/examples/nerf.md explains the setting and the numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.task_nerf holds the renderer, the TinyNeRF and the scoring


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8x8 images and a tiny head: runs in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=None, help="save base / OCD / oracle / ground truth of one test view here")
    p.add_argument("--conditioning", choices=("nerf", "mean"), default="nerf")
    p.add_argument(
        "--data-root",
        default=str(ROOT.parent / "shared" / "data"),
        help="the folder with models/efficientnet-lite0-57934424.pth; without it f is the mean rendered colour",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from benchmarks.task_nerf import run_seed, save_figure

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    record = run_seed(
        args.seed,
        data_root=args.data_root,
        quick=args.quick,
        keep=args.figure is not None,
        conditioning=args.conditioning,
    )
    s, c = record["sizes"], record["conditioning"]
    print(
        f"3 scenes, {s['image']}x{s['image']} images, {s['train_views']} train / {s['val_views']} validation / "
        f"{s['test_views']} test views each; layer1 {s['weight_shape']}, seed {args.seed}\n"
        f"conditioning {c['name']}: i_L, a_L {c['i_L, a_L']}; f: {c['f']}"
    )
    for scene, t in record["times"].items():
        g = record["per_group"][scene]
        print(f"  {scene}: base model {t['base_s']:.1f}s, OCD {t['ocd_s']:.1f}s, delta_scale {g['delta_scale']:g}")
    print("\nTest views, averaged over the scenes:\n\n| row | MSE | PSNR (dB) |\n|---|---|---|")
    for name, r in record["rows"].items():
        print(f"| {name} | {r['mse']:.5f} | {r['psnr']:.2f} |")
    if args.figure:
        save_figure(record, args.figure)
        print(f"\nfigure saved to {args.figure}")
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
