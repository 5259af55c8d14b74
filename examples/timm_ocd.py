"""OCD on a timm model: ImageNet EfficientNet-Lite0, its classifier fine-tuned briefly on Fashion-MNIST.

    # offline: a local EfficientNet-Lite0 state dict and the Fashion-MNIST idx files
    python examples/timm_ocd.py --weights ../shared/data/models/efficientnet-lite0-57934424.pth \\
        --data-dir ../shared/data/vision/fashion-mnist

    # online: timm's pretrained tf_efficientnet_lite0 and the Hub dataset zalando-datasets/fashion_mnist
    python examples/timm_ocd.py

    # any timm architecture, offline, randomly initialised, tiny budget (a smoke test: seconds to a minute)
    python examples/timm_ocd.py --model vit_tiny_patch16_224 --random-init --quick \
        --data-dir ../shared/data/vision/fashion-mnist

A few hundred grey images are upsampled to RGB (preprocessing of the weights: (x - 127) / 128), the
backbone stays frozen, a new 10-class classifier is trained on its features, and OCD generates the
classifier's weights per image. Prints base vs OCD vs OCD x5 on held-out images.
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

HUB_ID = "zalando-datasets/fashion_mnist"


def read_idx(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N] of one split ("train" or "t10k") from the gzipped idx files."""
    images, labels = folder / f"{split}-images-idx3-ubyte.gz", folder / f"{split}-labels-idx1-ubyte.gz"
    for f in (images, labels):
        if not f.exists():
            sys.exit(f"{f} not found: --data-dir must hold the Fashion-MNIST idx files ({f.name}, ...).")
    x = np.frombuffer(gzip.open(images).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(labels).read(), np.uint8, offset=8)
    return x, y


def load_fashion_mnist(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from local idx files or the Hub dataset."""
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


def preprocess(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 3, size, size] with (x - 127) / 128, as the Lite0 weights expect."""
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 127.0) / 128.0).expand(-1, 3, -1, -1).contiguous()


def build_model(name: str, weights: str | None, random_init: bool = False, image_size: int = 224):
    import timm

    if random_init:
        try:  # ViTs and other fixed-size models are built for the image size used here
            return timm.create_model(name, pretrained=False, img_size=image_size)
        except TypeError:  # models without img_size take any size
            return timm.create_model(name, pretrained=False)
    if weights is None:
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as e:
            sys.exit(
                f"Could not download pretrained {name} ({type(e).__name__}: {e}). Offline? Pass --weights with a local state dict."
            )
    if not Path(weights).exists():
        sys.exit(f"Weights file {weights} not found.")
    model = timm.create_model(name, pretrained=False)
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    own = model.state_dict()
    if len(sd) != len(own) or any(a.shape != b.shape for a, b in zip(own.values(), sd.values())):
        sys.exit(f"{weights} does not match {name}'s tensors in number, shape and order.")
    model.load_state_dict(dict(zip(own, sd.values())))  # same tensors, other names
    return model


@torch.no_grad()
def features(model, x: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    return torch.cat([model.forward_head(model.forward_features(b), pre_logits=True) for b in x.split(batch_size)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name")
    p.add_argument(
        "--weights", default=None, help="local state dict for --model (default: timm's pretrained weights, online)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="Fashion-MNIST idx folder (default: Hub dataset zalando-datasets/fashion_mnist)",
    )
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument(
        "--val-size",
        type=int,
        default=200,
        help="training-split images held out to choose delta_scale (0: uncalibrated)",
    )
    p.add_argument(
        "--image-size", type=int, default=128, help="side of the upsampled images (the weights were trained at 224)"
    )
    p.add_argument("--head-epochs", type=int, default=100, help="full-batch epochs for the new classifier")
    p.add_argument("--layer", default=None, help="layer to generate (default: the classifier)")
    p.add_argument("--ocd-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder to save the trained OCD head to")
    p.add_argument("--random-init", action="store_true", help="no weights: timm's random initialisation (offline)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny budget (a smoke test): 64 train / 32 test images at 32px, 20 classifier epochs, 20 OCD steps, small OCD head",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.image_size, args.head_epochs, args.ocd_steps = 64, 32, 32, 20, 20
        args.val_size = min(args.val_size, 32)

    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate
    from ocd_hf.integrations import get_adapter

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = load_fashion_mnist(args.data_dir)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(ytr))  # validation images are training-split images the model never saw
    tr, va = perm[: args.train_size], perm[args.train_size : args.train_size + args.val_size]
    te = rng.permutation(len(yte))[: args.test_size]
    val = TensorDataset(preprocess(xtr[va], args.image_size), torch.from_numpy(ytr[va].astype(np.int64)))
    x_train, x_test = preprocess(xtr[tr], args.image_size), preprocess(xte[te], args.image_size)
    y_train, y_test = torch.from_numpy(ytr[tr].astype(np.int64)), torch.from_numpy(yte[te].astype(np.int64))

    model = build_model(args.model, args.weights, args.random_init, args.image_size).eval()
    model.reset_classifier(10)
    # fine-tune the new classifier on frozen features
    feats = features(model, x_train)
    head = model.get_classifier()
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(args.head_epochs):
        opt.zero_grad()
        F.cross_entropy(head(feats), y_train).backward()
        opt.step()
    print(
        f"{args.model} on Fashion-MNIST ({len(y_train)} train / {len(va)} validation / {len(y_test)} test images at {args.image_size}px): "
        f"classifier fine-tuned in {time.perf_counter() - t0:.0f}s"
    )

    t1 = time.perf_counter()
    layer = args.layer or get_adapter(model).preferred_layer  # timm names its classifier
    small = {"block_out_channels": (16, 16, 32), "cond_hidden_dim": 16, "scale_hidden_dim": 16} if args.quick else {}
    ocd = OCDWrapper.from_pretrained(model, layer=layer, **small)
    ocd.fit(
        TensorDataset(x_train, y_train),
        eval_dataset=val if len(va) else None,
        batch_size=32,
        num_train_steps=args.ocd_steps,
        seed=args.seed,
    )  # cross-entropy comes from the timm integration
    print(
        f"OCD on {ocd.config.layer} {tuple(ocd.layer.weight.shape)}: collected, trained and calibrated "
        f"(delta_scale {ocd.delta_scale:g}) in {time.perf_counter() - t1:.0f}s"
    )

    report = evaluate(ocd, TensorDataset(x_test, y_test), num_samples=5, batch_size=50, seed=args.seed)
    print(f"\nHeld-out Fashion-MNIST test images ({len(y_test)}):")
    print(report.to_markdown())
    if args.save:
        ocd.save_pretrained(args.save, evaluation=report)
        print(f"saved the OCD head to {args.save}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
