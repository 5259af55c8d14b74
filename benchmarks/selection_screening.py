"""Does the linearised screening rank layers as the full Eq. 6 criterion does? The demo LeNet and an MLP.

For 3 seeds each: the digits LeNet (`ocd_hf.demo`, 30 epochs) and a 3-layer MLP on the flattened digits
(200 full-batch Adam steps), 32 selection samples. Prints each layer's full score (K perturbations) and
screening score, both winners and the Spearman correlation of the two rankings.

Run: python -m benchmarks.selection_screening [--perturbations 1000]
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr
from torch import nn

from ocd_hf import select_layer
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base


def compare(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int) -> None:
    t = time.perf_counter()
    full = select_layer(model, (x, y), loss="cross_entropy", num_perturbations=k)
    t_full = time.perf_counter() - t
    t = time.perf_counter()
    screened = select_layer(model, (x, y), loss="cross_entropy", num_perturbations=k, finalists=1)
    t_screen = time.perf_counter() - t
    names = [s.name for s in full.scores]
    rho = spearmanr([s.score for s in full.scores], [screened.screen[n] for n in names]).statistic
    print(
        f"{name}: full winner {full.winner} ({t_full:.1f} s), screened winner {screened.winner} "
        f"({t_screen:.1f} s), Spearman {rho:.2f}"
    )
    for n in names:
        print(f"    {n}: full {full.score_of(n):.1f}, screening {screened.screen[n]:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--perturbations", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(1)
    for seed in args.seeds:
        train, _ = load_digits_split(seed)
        torch.manual_seed(seed)
        lenet = train_base(LeNetDigits(), train, epochs=30, seed=seed).eval()
        x, y = train.tensors[0], train.tensors[1]
        compare(f"LeNet seed {seed}", lenet, x[:32], y[:32], args.perturbations)
        flat = x.flatten(1)
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(flat.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(mlp.parameters(), 1e-2)
        for _ in range(200):
            opt.zero_grad()
            nn.functional.cross_entropy(mlp(flat), y).backward()
            opt.step()
        compare(f"MLP seed {seed}", mlp.eval(), flat[:32], y[:32], args.perturbations)


if __name__ == "__main__":
    main()
