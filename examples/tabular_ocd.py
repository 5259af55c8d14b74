"""OCD for regression: a 3-layer MLP on California housing (the paper's "CA" setting), loss mse.

    # offline: a local CSV with the 8 features and the target column MedHouseVal
    python examples/tabular_ocd.py --data ../shared/data/tabular/california_housing.csv.gz

    # online: scikit-learn downloads the same data (fetch_california_housing)
    python examples/tabular_ocd.py

Trains the MLP, generates per-sample weights for its middle layer (fc2, 64x64), chooses delta_scale on a
validation split and prints the evaluation (base, oracle, OCD, OCD x5 averaged outputs...) on a test split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

TARGET = "MedHouseVal"


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load(path: str | None) -> tuple[np.ndarray, np.ndarray]:
    if path is None:
        from sklearn.datasets import fetch_california_housing

        try:
            d = fetch_california_housing()
        except Exception as e:
            sys.exit(
                f"Could not download California housing ({type(e).__name__}: {e}). Offline? Pass --data with a local CSV."
            )
        return d.data.astype(np.float32), d.target.astype(np.float32)
    import pandas as pd

    if not Path(path).exists():
        sys.exit(f"Data file {path} not found (expected a CSV with 8 feature columns and {TARGET!r}).")
    df = pd.read_csv(path)
    if TARGET not in df.columns:
        sys.exit(f"{path} has no {TARGET!r} column (columns: {list(df.columns)}).")
    return df.drop(columns=[TARGET]).to_numpy(np.float32), df[TARGET].to_numpy(np.float32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="local california_housing CSV (default: download with scikit-learn)")
    p.add_argument("--layer", default="fc2", help="layer to generate ('auto': entropy selection)")
    p.add_argument("--epochs", type=int, default=30, help="base model training epochs")
    p.add_argument("--ocd-steps", type=int, default=2000)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out for calibrating delta_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder to save the trained OCD head to")
    args = p.parse_args(argv)

    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    x, y = load(args.data)
    perm = np.random.default_rng(args.seed).permutation(len(y))
    n_test, n_val = int(len(y) * args.test_fraction), int(len(y) * args.val_fraction)
    te, va, tr = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
    mean, std = x[tr].mean(0), x[tr].std(0)
    x = (x - mean) / std
    split = lambda i: TensorDataset(torch.from_numpy(x[i]), torch.from_numpy(y[i])[:, None])  # noqa: E731
    # the validation houses are never trained on: OCD's delta_scale is chosen on them
    train, val, test = split(tr), split(va), split(te)

    model = MLP(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = train.tensors
    for _ in range(args.epochs):
        for idx in torch.randperm(len(ys)).split(128):
            opt.zero_grad()
            nn.functional.mse_loss(model(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    print(f"California housing: {len(train)} train / {len(test)} test; MLP trained in {time.perf_counter() - t0:.0f}s")

    t1 = time.perf_counter()
    ocd = OCDWrapper.from_pretrained(model, layer=args.layer)
    ocd.fit(train, loss="mse", batch_size=256, eval_dataset=val, num_train_steps=args.ocd_steps, seed=args.seed)
    print(
        f"OCD on {ocd.config.layer} {tuple(ocd.layer.weight.shape)}: collected, trained and calibrated in {time.perf_counter() - t1:.0f}s; "
        f"delta_scale {ocd.delta_scale} (0: no gain on validation, OCD is off)"
    )

    report = evaluate(ocd, test, num_samples=5, seed=args.seed, validation=val)
    print(f"\nHeld-out houses ({len(test)}), target {TARGET} (units of $100k):")
    print(report.to_markdown())
    if args.save:
        ocd.save_pretrained(args.save, evaluation=report)
        print(f"saved the OCD head to {args.save}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
