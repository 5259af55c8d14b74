"""The paper's MNIST / LeNet5 setting on Fashion-MNIST: OCD generates LeNet5's fc2 (120 -> 84) per image.

    # offline: a folder with the four idx files ({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz)
    python examples/lenet5_fashion_mnist.py --data-dir ../shared/data/vision/fashion-mnist

    # online: the Hub dataset zalando-datasets/fashion_mnist
    python examples/lenet5_fashion_mnist.py

Trains LeNet5 on a subset, collects per-sample deltas of fc2 on the same images, trains the OCD head,
chooses its delta_scale on held-out validation images, and prints the evaluation on test images.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

HUB_ID = "zalando-datasets/fashion_mnist"


class LeNet5(nn.Module):
    """LeCun et al. 1998 on 28x28 inputs (conv1 pads by 2, as for the 32x32 original): 400 -> 120 -> 84 -> 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def read_idx(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = folder / f"{split}-images-idx3-ubyte.gz", folder / f"{split}-labels-idx1-ubyte.gz"
    for f in (images, labels):
        if not f.exists():
            sys.exit(
                f"{f} not found: --data-dir must hold the Fashion-MNIST idx files ({split}-images-idx3-ubyte.gz, ...)."
            )
    x = np.frombuffer(gzip.open(images).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(labels).read(), np.uint8, offset=8)
    return x, y


def load(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if data_dir is not None:
        return (*read_idx(Path(data_dir), "train"), *read_idx(Path(data_dir), "t10k"))
    from datasets import load_dataset

    try:
        ds = load_dataset(HUB_ID)
    except Exception as e:
        sys.exit(f"Could not load {HUB_ID} ({type(e).__name__}: {e}). Offline? Pass --data-dir with the idx files.")
    arrays = []
    for split in ("train", "test"):
        arrays += [np.stack([np.asarray(im) for im in ds[split]["image"]]), np.asarray(ds[split]["label"])]
    return tuple(arrays)


def to_tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help=f"folder with the idx .gz files (default: Hub dataset {HUB_ID})")
    p.add_argument("--train-size", type=int, default=10000, help="training images (base model and OCD)")
    p.add_argument("--val-size", type=int, default=1000, help="held-out training images for calibrating delta_scale")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=5, help="base model training epochs")
    p.add_argument("--layer", default="fc2")
    p.add_argument("--ocd-steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder to save the trained OCD head to")
    args = p.parse_args(argv)

    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = load(args.data_dir)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ytr))
    tr, va, te = (
        perm[: args.train_size],
        perm[args.train_size : args.train_size + args.val_size],
        rng.permutation(len(yte))[: args.test_size],
    )
    # validation images the base model never sees: OCD's delta_scale is chosen on them
    train, val, test = to_tensors(xtr[tr], ytr[tr]), to_tensors(xtr[va], ytr[va]), to_tensors(xte[te], yte[te])

    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = train.tensors
    for _ in range(args.epochs):
        for idx in torch.randperm(len(ys)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    print(
        f"Fashion-MNIST: {len(train)} train / {len(test)} test images; LeNet5 trained in {time.perf_counter() - t0:.0f}s"
    )

    t1 = time.perf_counter()
    ocd = OCDWrapper.from_pretrained(model, layer=args.layer)
    ocd.fit(
        train, loss="cross_entropy", batch_size=256, eval_dataset=val, num_train_steps=args.ocd_steps, seed=args.seed
    )
    print(
        f"OCD on {ocd.config.layer} {tuple(ocd.layer.weight.shape)}: collected, trained and calibrated in {time.perf_counter() - t1:.0f}s; "
        f"delta_scale {ocd.delta_scale} (0: no gain on validation, OCD is off)"
    )

    report = evaluate(ocd, test, num_samples=5, seed=args.seed, validation=val)
    print(f"\nHeld-out Fashion-MNIST test images ({len(test)}):")
    print(report.to_markdown())
    if args.save:
        ocd.save_pretrained(args.save, evaluation=report)
        print(f"saved the OCD head to {args.save}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
