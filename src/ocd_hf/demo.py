"""`make demo`: OCD end to end on scikit-learn's digits with a small LeNet-style network.

Trains the base model, overfits every training sample on `fc2` (84x120, LeNet5's second dense layer),
trains the OCD head, picks its delta_scale on a validation split the base model never saw, and prints
the evaluation on held-out digits: base, temperature scaling, kNN, oracles, OCD, ensembles and the
nearest-neighbour / no-scale / mean-delta controls.
Run: python -m ocd_hf.demo [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .evaluation import evaluate
from .trainer import OCDTrainer
from .training_args import OCDTrainingArguments
from .wrapper import OCDWrapper


class LeNetDigits(nn.Module):
    """LeNet5's shape scaled to 8x8 inputs: two conv blocks, then 64 -> 120 -> 84 -> 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(64, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load_digits_split(seed: int = 0, test_fraction: float = 0.33) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of scikit-learn's digits, split with `seed`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def train_base(model: nn.Module, data: TensorDataset, epochs: int = 30, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="denoiser training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer", default="fc2")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "sample", "v_prediction"])
    p.add_argument("--save", default=None, help="folder to save the trained head to")
    p.add_argument(
        "--early-stopping-patience",
        type=int,
        default=None,
        help="stop head training after this many held-out evaluations (every 100 steps) without improvement",
    )
    p.add_argument(
        "--channels", type=int, nargs="+", default=None, help="U-Net block_out_channels (default: sized from the layer)"
    )
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    full_train, test = load_digits_split(args.seed)
    # the last 200 training images are held out: delta_scale is chosen on data the base model never saw
    x, y = full_train.tensors
    train, val = TensorDataset(x[:-200], y[:-200]), TensorDataset(x[-200:], y[-200:])
    model = train_base(LeNetDigits(), train, seed=args.seed)
    print(
        f"digits: {len(train)} train / {len(val)} validation / {len(test)} test; base model trained in {time.perf_counter() - t0:.1f}s"
    )

    config = {"prediction_type": args.prediction_type} if args.prediction_type else {}
    if args.channels:
        # the conditioning encoders and scale net follow the U-Net's width, as the auto sizes do
        w = 2 * args.channels[0]
        config.update(block_out_channels=tuple(args.channels), cond_hidden_dim=w, scale_hidden_dim=w)
    ocd = OCDWrapper.from_pretrained(model, layer=args.layer, **config)
    training = OCDTrainingArguments(
        num_train_steps=args.steps, seed=args.seed, early_stopping_patience=args.early_stopping_patience
    )
    trainer = OCDTrainer(ocd, training, loss="cross_entropy")
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as deltas:
        # trainer.train(train, eval_dataset=val) in three steps, to keep the collection for the nearest-neighbour row
        store = trainer.collect(train, deltas)
        t2 = time.perf_counter()
        history = trainer.train_head(store)
        stopped = " (stopped early)" if history[-1].get("stopped_early") else ""
        print(
            f"head {list(ocd.config.block_out_channels)}: {len(history)} steps{stopped} in "
            f"{time.perf_counter() - t2:.1f}s"
        )
        calibration = trainer.calibrate(val)
        print(
            f"collected deltas, trained the head and calibrated in {time.perf_counter() - t1:.1f}s; "
            f"delta_scale {calibration['delta_scale']} (validation gain over base {calibration['gain_vs_base']:.4f} ± {calibration['gain_se']:.4f} SE)"
        )
        report = evaluate(
            ocd,
            test,
            num_samples=5,
            seed=args.seed,
            validation=val,
            train=train,
            collection=store,
            oracle_all_layers=True,
        )
    print()
    print(f"Held-out digits ({len(test)} samples), layer {args.layer}, seed {args.seed}:")
    print(report.to_markdown())
    if args.save:
        ocd.save_pretrained(args.save, evaluation=report)
        print(f"saved head to {args.save}")
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
