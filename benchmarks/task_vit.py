"""ViT / DeiT (paper Tab. 2): a DeiT-Tiny-width ViT trained from scratch on Fashion-MNIST, OCD on its classifier
and on one encoder MLP layer, each generating the full delta and the factored one.

    python -m benchmarks.task_vit --seeds 0 1 2                  # -> docs/results/vit.{json,md}
    python -m benchmarks.task_vit --seeds 0 --quick --out-dir /tmp/vit   # a smoke test (seconds)
    python -m benchmarks.task_vit --seeds 1 & python -m benchmarks.task_vit --seeds 2 & wait  # seeds in parallel;
    python -m benchmarks.task_vit --seeds 0 1 2    # ... then the tables from the saved records (build/bench-runs)

Stands in for the paper's Tab. 2 (DeiT-Tiny on TinyImageNet, OCD on the head). No pretrained weights
are reachable offline, so the base model is timm's `deit_tiny_patch16_224` architecture (width 192,
3 heads, MLP 768) built for 32x32 grey images with 8x8 patches (16 patches and a class token) and
4 blocks instead of 12, trained from scratch with Adam (`benchmarks.models.fit_torch`): 4x4 patches
(64 tokens) cost about four times as much per image and learnt more slowly per second on a 2-core CPU
(docs/examples/vit.md). Images are Fashion-MNIST, zero-padded 28 -> 32 (the background is 0). Splits
are disjoint and seeded: train and val from the 60k training file, test from t10k.

Heads (`HEADS`): the classifier `head` (10x192) and the last block's `mlp.fc2` (192x768; its input is
[B, tokens, 768], pooled over tokens for the conditioning), each with target="full" and "factored".
Every head is collected on the base model's own training images (the paper's recipe; the fc2 full
head on the first `fc2_full_train` of them, its deltas being 147k numbers each), trained, calibrated
on val (`OCDWrapper.calibrate`) and scored on test by `ocd_hf.evaluation.evaluate` with every row.
Row labels are `ocd_hf.evaluation.Row`'s with the head in brackets (`head_label`); the rows that do
not depend on the head (base, temperature scaling, the all-layers oracle) have no suffix.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from ocd_hf.evaluation import Row

from .data import FASHION_DIR, image_dataset, read_idx, split_indices
from .models import fit_torch, preserved_rng
from .stats import calibration_rule, fmt, paired, paired_verdict
from .tables import atomic_write

TASK = "vit"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
ARCHITECTURE = "deit_tiny_patch16_224"
IMAGE_SIZE, PATCH_SIZE, NUM_CLASSES = 32, 8, 10
METRICS = ["cross_entropy", "accuracy", "ece"]
HIGHER_IS_BETTER = {"cross_entropy": False, "accuracy": True, "ece": False}
NUM_SAMPLES = 5  # draws of the ensemble rows
INFERENCE_STEPS = (1, 2)  # the few-step rows, beside the config's 10 DDIM steps
SHARED_ROWS = (Row.BASE, Row.TEMPERATURE, Row.ORACLE_ALL_LAYERS)  # rows that do not depend on the head


@dataclass(frozen=True)
class Sizes:
    """Split sizes, base recipe and OCD budget of one run.

    Args:
        train: training images (base model and collection).
        val: validation images (calibration, temperature, kNN's k).
        test: test images.
        depth: transformer blocks.
        epochs: base training epochs (Adam, batch 64).
        lr: base learning rate.
        head_steps: OCD head training steps.
        fc2_full_train: training images collected for the fc2 full head (its deltas are the largest).
        head_kwargs: OCDConfig network sizes of every head.
        all_layers_oracle: also score the all-layers oracle (one sample at a time).
    """

    train: int
    val: int
    test: int
    depth: int
    epochs: int
    lr: float
    head_steps: int
    fc2_full_train: int
    head_kwargs: tuple[tuple[str, Any], ...]
    all_layers_oracle: bool


SMALL_HEAD = (("block_out_channels", (32, 32, 64)), ("cond_hidden_dim", 64), ("scale_hidden_dim", 64))
TINY_HEAD = (("block_out_channels", (16, 16, 32)), ("cond_hidden_dim", 16), ("scale_hidden_dim", 16))
FULL = Sizes(4000, 500, 1000, 4, 3, 1e-3, 500, 500, SMALL_HEAD, True)
QUICK = Sizes(64, 32, 32, 1, 1, 1e-3, 10, 32, TINY_HEAD, False)


def heads(depth: int) -> list[tuple[str, str]]:
    """(layer, target) of the four heads: the classifier and the last block's MLP fc2, full and factored."""
    fc2 = f"blocks.{depth - 1}.mlp.fc2"
    return [("head", "full"), ("head", "factored"), (fc2, "full"), (fc2, "factored")]


def head_label(row: str, layer: str, target: str) -> str:
    """A row of the head on `layer` generating `target` deltas, e.g. 'OCD x5 [head, full]'."""
    return f"{row} [{layer}, {target}]"


# ---------------------------------------------------------------------------------------------- data and model
def pad_to(ds: TensorDataset, size: int = IMAGE_SIZE) -> TensorDataset:
    """Zero-pad the images of (images [N, 1, H, W], labels) to size x size (centred)."""
    x, y = ds.tensors
    dh, dw = size - x.shape[-2], size - x.shape[-1]
    return TensorDataset(F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)), y)


def splits(seed: int, data_root: str | Path, sizes: Sizes) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Seeded disjoint (train, val, test) of padded Fashion-MNIST images in [0, 1]."""
    folder = Path(data_root) / FASHION_DIR
    xtr, ytr = read_idx(folder, "train")
    xte, yte = read_idx(folder, "t10k")
    tr, va = split_indices(len(ytr), (sizes.train, sizes.val), seed)
    (te,) = split_indices(len(yte), (sizes.test,), seed + 1_000_003)
    return tuple(pad_to(image_dataset(x[i], y[i])) for x, y, i in ((xtr, ytr, tr), (xtr, ytr, va), (xte, yte, te)))


def build_vit(depth: int) -> nn.Module:
    """timm's DeiT-Tiny architecture for 32x32 grey images, randomly initialised, `depth` blocks."""
    import timm

    return timm.create_model(
        ARCHITECTURE,
        pretrained=False,
        img_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        in_chans=1,
        num_classes=NUM_CLASSES,
        depth=depth,
    )


def train_base(train: TensorDataset, sizes: Sizes, seed: int) -> nn.Module:
    """A fresh ViT trained from scratch on `train` (Adam, batch 64); eval mode."""
    with preserved_rng():
        torch.manual_seed(seed)
        model = build_vit(sizes.depth)
    return fit_torch(model, train, F.cross_entropy, epochs=sizes.epochs, batch_size=64, lr=sizes.lr, seed=seed)


# ---------------------------------------------------------------------------------------------- one head
def fit_head(
    model: nn.Module, layer: str, target: str, train: Any, val: Any, sizes: Sizes, seed: int, collect_dir: Path
) -> tuple[Any, Any, dict[str, Any]]:
    """Collect, train and calibrate one head; returns (the wrapper, its collection, the calibration record)."""
    from ocd_hf import OCDWrapper

    ocd = OCDWrapper.from_pretrained(model, layer=layer, target=target, **dict(sizes.head_kwargs))
    kw = dict(batch_size=64, seed=seed, progress=False)
    store = ocd.collect(train, collect_dir=str(collect_dir), **kw)
    ocd.train_head(store, num_train_steps=sizes.head_steps, seed=seed, progress=False)
    calibration = ocd.calibrate(val, batch_size=256, seed=seed, progress=False)
    return ocd, store, calibration


def run_seed(seed: int, *, data_root: str | Path, quick: bool = False) -> dict:
    """Train the base ViT, fit the four heads, score them on test: one JSON-able record.

    Args:
        seed: seeds the splits, the base model's initialisation and batch order, and every head.
        data_root: the folder that holds vision/fashion-mnist/ (../shared/data from the project root).
        quick: tiny sizes (a smoke test).
    """
    from ocd_hf.evaluation import evaluate  # imports the whole package: only when a run starts

    sizes = QUICK if quick else FULL
    t0 = time.perf_counter()
    train, val, test = splits(seed, data_root, sizes)
    model = train_base(train, sizes, seed)
    rec: dict[str, Any] = {
        "task": TASK,
        "seed": seed,
        "metrics": METRICS,
        "higher_is_better": HIGHER_IS_BETTER,
        "rows": {},
        "cosine": {},
        "health": {},
        "delta_scale": {},
        "calibration": {},
        "extra": {},
        "seconds": {"base": time.perf_counter() - t0},
        "sizes": {
            **{k: v for k, v in asdict(sizes).items() if k != "head_kwargs"},
            "head_kwargs": dict(sizes.head_kwargs),
            "model": f"timm {ARCHITECTURE}, img_size {IMAGE_SIZE}, patch_size {PATCH_SIZE}, in_chans 1, "
            f"num_classes {NUM_CLASSES}, depth {sizes.depth}",
            "parameters": sum(p.numel() for p in model.parameters()),
            "source": "Fashion-MNIST zero-padded to 32x32: train/val from the 60k train file, test from t10k",
        },
    }
    ev = dict(num_samples=NUM_SAMPLES, batch_size=256, seed=seed, progress=False, inference_steps=INFERENCE_STEPS)
    with tempfile.TemporaryDirectory(prefix="ocd-vit-") as tmp:
        for i, (layer, target) in enumerate(heads(sizes.depth)):
            t = time.perf_counter()
            big = layer != "head" and target == "full"
            data = Subset(train, range(min(sizes.fc2_full_train, len(train)))) if big else train
            ocd, store, calibration = fit_head(model, layer, target, data, val, sizes, seed, Path(tmp) / str(i))
            fitted = time.perf_counter()
            report = evaluate(
                ocd,
                test,
                validation=val,
                train=data,
                collection=store,
                oracle_all_layers=sizes.all_layers_oracle and i == 0,
                **ev,
            )
            name = f"{layer}, {target}"
            for row, metrics in report.rows.items():
                rec["rows"][row if row in SHARED_ROWS else head_label(row, layer, target)] = metrics
            rec["cosine"][name] = report.cosine_to_oracle
            rec["health"][name] = report.health
            rec["delta_scale"][name] = ocd.delta_scale
            rec["calibration"][name] = calibration
            rec["extra"][name] = {**report.extra, "collected": len(data), "weight": list(ocd.layer.weight.shape)}
            rec["seconds"][name] = {"fit": fitted - t, "evaluate": time.perf_counter() - fitted}
            del ocd, store
    rec["wall_s"] = time.perf_counter() - t0
    return rec


# ---------------------------------------------------------------------------------------------- tables
def markdown(records: list[dict], command: str) -> str:
    """Mean ± SD over seeds, one row per row label, one column per metric."""
    seeds = [r["seed"] for r in records]
    first = records[0]
    rule = calibration_rule(c.get("min_gain_se") for r in records for c in r.get("calibration", {}).values())
    lines = [
        f"## ViT (DeiT-Tiny width) on Fashion-MNIST, OCD on the classifier and on an encoder MLP layer ({len(seeds)} seeds)",
        "",
        f"Command: `{command}`; seeds {seeds}; {datetime.now(timezone.utc):%Y-%m-%d} UTC; torch {torch.__version__}, "
        f"Python {platform.python_version()}, 1 thread. Mean ± SD over seeds; lower is better for cross-entropy and ECE. "
        "OCD rows use each head's delta_scale chosen on the validation split (0 = switched off"
        + (", " + rule if rule else "")
        + "); "
        '"oracle" rows overfit on the *test* label (upper bounds, not methods).',
        "",
        f"Model: {first['sizes']['model']} ({first['sizes']['parameters']:,} parameters), trained from scratch "
        f"({first['sizes']['epochs']} epochs, Adam {first['sizes']['lr']:g}, batch 64). Data: {first['sizes']['source']}; "
        f"train {first['sizes']['train']}, val {first['sizes']['val']}, test {first['sizes']['test']}. Heads: "
        f"{first['sizes']['head_kwargs']}, {first['sizes']['head_steps']} training steps, 10 DDIM steps; the fc2 full "
        f"head is collected on the first {first['sizes']['fc2_full_train']} training images.",
        "",
        "Wall time per seed: " + ", ".join(f"seed {r['seed']}: {r['wall_s']:.0f} s" for r in records) + ".",
        "",
        "| row | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for row in first["rows"]:
        vals = [[r["rows"][row][m] for r in records if row in r["rows"]] for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(fmt(v) for v in vals) + " |")
    lines += ["", "OCD against base, cross-entropy paired per seed (`benchmarks.stats`):", ""]
    for name in first["delta_scale"]:
        layer, target = name.split(", ")
        for row in (Row.OCD, Row.ensemble(NUM_SAMPLES)):
            label = head_label(row, layer, target)
            p = paired(
                records, lambda r: r["rows"][label]["cross_entropy"], lambda r: r["rows"][Row.BASE]["cross_entropy"]
            )
            lines.append("- " + paired_verdict(p, "CE", label, Row.BASE))
    lines += ["", "delta_scale per head and seed:", ""]
    for name in first["delta_scale"]:
        lines.append(f"- {name}: " + ", ".join(f"{r['delta_scale'][name]:g}" for r in records))
    lines += ["", "Mean cosine of one OCD draw to the oracle delta (test images):", ""]
    for name in first["cosine"]:
        lines.append(f"- {name}: " + fmt([r["cosine"][name]["OCD (1 draw)"] for r in records]))
    return "\n".join(lines) + "\n"


def run_path(runs_dir: str | Path, seed: int, quick: bool) -> Path:
    """Where one seed's record is saved (quick runs apart from full ones)."""
    return Path(runs_dir) / f"{TASK}{'-quick' if quick else ''}-seed{seed}.json"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA), help="the folder with vision/fashion-mnist/")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT))
    p.add_argument(
        "--runs-dir",
        default=str(ROOT / "build" / "bench-runs"),
        help="each seed's record is saved here as it finishes and reused by a rerun (seeds can run in parallel "
        "processes, then one call with all seeds writes the tables)",
    )
    p.add_argument("--force", action="store_true", help="rerun seeds whose record is saved")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    records = []
    for seed in args.seeds:
        path = run_path(args.runs_dir, seed, args.quick)
        if path.exists() and not args.force:
            records.append(json.loads(path.read_text()))
            print(f"seed {seed}: saved record {path}", flush=True)
            continue
        rec = run_seed(seed, data_root=args.data_root, quick=args.quick)
        atomic_write(path, json.dumps(rec, indent=1))
        print(f"seed {seed}: {rec['wall_s']:.0f} s", flush=True)
        records.append(rec)
    out = Path(args.out_dir)
    command = "python -m benchmarks.task_vit " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write(out / f"{TASK}.json", json.dumps({"command": command, "runs": records}, indent=1))
    atomic_write(out / f"{TASK}.md", markdown(records, command))
    print(markdown(records, command))


if __name__ == "__main__":
    main()
