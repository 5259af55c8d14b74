"""OCD on a vision transformer: timm's DeiT-Tiny architecture, trained from scratch on Fashion-MNIST.

    # the paper's DeiT setting (Tab. 2): OCD generates the classifier `head` (10 x 192) per image; minutes
    python examples/vit_fashion_ocd.py --data-dir ../shared/data/vision/fashion-mnist

    # an encoder MLP layer instead (192 x 768, tokens pooled), generating u of Δ = u v̂ᵀ only
    python examples/vit_fashion_ocd.py --data-dir ../shared/data/vision/fashion-mnist \\
        --layer blocks.3.mlp.fc2 --target factored

    # a smoke test: tiny sizes, seconds
    python examples/vit_fashion_ocd.py --data-dir ../shared/data/vision/fashion-mnist --quick

No pretrained weights are needed: the model is `deit_tiny_patch16_224` (width 192, 3 heads, MLP 768)
built for 32x32 grey images with 8x8 patches (16 patches and a class token) and 4 blocks instead of
12, so that it trains from scratch on a laptop CPU in minutes. Images are zero-padded 28 -> 32. OCD collects per-image
deltas of the layer on the training images, trains its head, chooses delta_scale on held-out
validation images, and the evaluation compares it with the base model, its upper bound (the oracle)
and the baselines on test images. The 3-seed benchmark of the same setting: benchmarks/task_vit.py.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def read_idx(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N] of one split ("train" or "t10k") from the gzipped idx files."""
    images, labels = folder / f"{split}-images-idx3-ubyte.gz", folder / f"{split}-labels-idx1-ubyte.gz"
    for f in (images, labels):
        if not f.exists():
            sys.exit(f"{f} not found: --data-dir must hold the Fashion-MNIST idx files ({f.name}, ...).")
    x = np.frombuffer(gzip.open(images).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(labels).read(), np.uint8, offset=8)
    return x, y


def dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """uint8 [N, 28, 28] -> float [N, 1, 32, 32] in [0, 1], zero-padded (the background is 0), and int64 labels."""
    images = F.pad(torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), (2, 2, 2, 2))
    return TensorDataset(images, torch.from_numpy(y.astype(np.int64)))


def train_vit(train: TensorDataset, depth: int, epochs: int, seed: int) -> torch.nn.Module:
    """DeiT-Tiny's architecture for 32x32 grey images, trained from scratch (Adam 1e-3, batch 64)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, in_chans=1, num_classes=10, depth=depth
    )
    x, y = train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="the folder with the four Fashion-MNIST idx files")
    p.add_argument("--layer", default="head", help="layer to generate: head, or blocks.<i>.mlp.fc2, ...")
    p.add_argument("--target", default="full", choices=["full", "factored"], help="generate the whole delta or u")
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--val-size", type=int, default=500, help="training-split images held out for calibration")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--depth", type=int, default=4, help="transformer blocks (DeiT-Tiny has 12)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ocd-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test): 64/32/32 images, 1 block")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.test_size, args.depth, args.epochs, args.ocd_steps = 64, 32, 32, 1, 1, 10
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and leaves the other cores free

    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate

    t0 = time.perf_counter()
    xtr, ytr = read_idx(Path(args.data_dir), "train")
    xte, yte = read_idx(Path(args.data_dir), "t10k")
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ytr))  # validation images are training-split images the model never saw
    tr, va = perm[: args.train_size], perm[args.train_size : args.train_size + args.val_size]
    te = rng.permutation(len(yte))[: args.test_size]
    train, val, test = dataset(xtr[tr], ytr[tr]), dataset(xtr[va], ytr[va]), dataset(xte[te], yte[te])
    model = train_vit(train, args.depth, args.epochs, args.seed)
    print(
        f"DeiT-Tiny width, {args.depth} blocks, trained from scratch on {len(tr)} Fashion-MNIST images "
        f"({args.epochs} epochs) in {time.perf_counter() - t0:.0f}s"
    )

    t1 = time.perf_counter()
    small = {"block_out_channels": (16, 16, 32), "cond_hidden_dim": 16, "scale_hidden_dim": 16} if args.quick else {}
    big = {"block_out_channels": (32, 32, 64), "cond_hidden_dim": 64, "scale_hidden_dim": 64}  # a CPU-sized head
    ocd = OCDWrapper.from_pretrained(model, layer=args.layer, target=args.target, **(small or big))
    ocd.fit(train, eval_dataset=val, batch_size=64, num_train_steps=args.ocd_steps, seed=args.seed, progress=False)
    print(
        f"OCD on {args.layer} {tuple(ocd.layer.weight.shape)}, target={args.target}: collected, trained and "
        f"calibrated (delta_scale {ocd.delta_scale:g}) in {time.perf_counter() - t1:.0f}s"
    )

    report = evaluate(ocd, test, validation=val, train=train, num_samples=5, seed=args.seed, progress=False)
    print(f"\nHeld-out Fashion-MNIST test images ({len(te)}):")
    print(report.to_markdown())
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
