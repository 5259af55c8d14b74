"""`ocd-hf` (also `python -m ocd_hf`): inspect, fit, evaluate and push OCD heads from the shell.

    ocd-hf info HEAD                                  # settings, layer, fingerprint, calibration, card metrics
    ocd-hf fit MODEL DATA --layer L --output HEAD     # a transformers / SetFit / timm folder + a data file
    ocd-hf evaluate HEAD DATA [--model MODEL]         # the evaluation table (base model from the head by default)
    ocd-hf push HEAD user/repo                        # one commit to the Hub

DATA is a .csv / .jsonl / .parquet file or a folder saved by `datasets` (`Dataset.save_to_disk`). Text
models read `--text-column` and `--label-column`; timm models read a `pixel_values` column of image arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from .integrations.optional import require

FAMILIES = ("auto", "transformers", "setfit", "timm")


# ---------------------------------------------------------------------------------------------- loading
def detect_family(folder: str) -> str:
    """setfit / timm / transformers from the files of a model folder (transformers when unsure)."""
    path = Path(folder)
    if (path / "config_setfit.json").exists() or (path / "model_head.pkl").exists():
        return "setfit"
    config = path / "config.json"
    if config.exists() and "architecture" in json.loads(config.read_text()):
        return "timm"
    return "transformers"


def load_model(source: str, family: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer or None) from a model folder or Hub id."""
    family = detect_family(source) if family == "auto" else family
    if family == "setfit":
        return require("setfit").SetFitModel.from_pretrained(source), None
    if family == "timm":
        timm = require("timm")
        return timm.create_model(f"local-dir:{source}" if os.path.isdir(source) else f"hf-hub:{source}").eval(), None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(source).eval(), AutoTokenizer.from_pretrained(source)


def load_table(path: str) -> Any:
    """A `datasets.Dataset` from a CSV / JSONL / parquet file or a `save_to_disk` folder."""
    import datasets

    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    import pandas as pd

    if path.endswith(".parquet"):
        df = pd.read_parquet(path)
    elif path.endswith((".jsonl", ".json", ".jsonl.gz")):
        df = pd.read_json(path, lines=True)
    elif path.endswith((".csv", ".csv.gz")):
        df = pd.read_csv(path)
    else:
        raise SystemExit(f"{path}: pass a .csv, .jsonl or .parquet file, or a folder saved by datasets.")
    return datasets.Dataset.from_pandas(df, preserve_index=False)


def to_rows(ds: Any, model: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    """The table as training rows for the model's family (tokenized for transformers, text + label for SetFit)."""
    label = args.label_column
    columns = set(ds.column_names)
    if label not in columns:
        raise SystemExit(f"No label column {label!r} in the data (columns: {sorted(columns)}); set --label-column.")
    if "pixel_values" in columns:
        return ds.with_format("torch", columns=["pixel_values", label])
    if args.text_column not in columns:
        raise SystemExit(f"No text column {args.text_column!r} (columns: {sorted(columns)}); set --text-column.")
    if tokenizer is None:  # SetFit tokenizes by itself
        return ds.select_columns([args.text_column, label]).rename_columns({args.text_column: "text", label: "label"})
    enc = tokenizer(list(ds[args.text_column]), truncation=True, max_length=args.max_length)
    return [{**{k: v[i] for k, v in enc.items()}, "label": ds[i][label]} for i in range(len(ds))]


def split(rows: Any, fraction: float, seed: int) -> tuple[Any, Any, Any]:
    """(train, calibration, test): `fraction` of the rows is held out, half of it chooses delta_scale and the
    other half gives the evaluation table, so the table is not measured on the rows the scale was chosen on.
    Parts left empty are None."""
    import numpy as np

    n = len(rows)
    order = np.random.default_rng(seed).permutation(n).tolist()
    k = int(round(n * fraction)) if fraction > 0 else 0
    kc = (k + 1) // 2
    pick = (lambda idx: rows.select(idx)) if hasattr(rows, "select") else (lambda idx: [rows[i] for i in idx])
    return pick(order[k:]), (pick(order[:kc]) if kc else None), (pick(order[kc:k]) if k > kc else None)


# ---------------------------------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    from .hub import resolve_head_files
    from .serialization import read_record
    from .state import to_dict

    files = resolve_head_files(args.head, revision=args.revision)
    rec = read_record(files.config, files.state)
    info = {
        "head": files.where,
        "layer": rec.config.layer,
        "weight_shape": list(rec.shapes.weight_shape),
        "layer_fingerprint": rec.provenance.layer_fingerprint,
        "base_model": rec.provenance.base_model,
        "base_model_library": rec.provenance.base_model_library,
        "conditioner": rec.provenance.conditioner,
        "delta_scale": rec.fitted.delta_scale,
        "calibrated": rec.fitted.calibration is not None,
        "calibration": rec.fitted.calibration,
        "config": to_dict(rec.config),
    }
    card = files.config.parent / "README.md"
    metrics = [ln for ln in card.read_text().splitlines() if ln.startswith("|")] if card.exists() else []
    if args.json:
        print(json.dumps({**info, "metrics": metrics}, indent=2, default=str))
        return 0
    for key in (
        "head",
        "layer",
        "weight_shape",
        "layer_fingerprint",
        "base_model",
        "base_model_library",
        "conditioner",
    ):
        print(f"{key}: {info[key]}")
    print(f"delta_scale: {info['delta_scale']:g} ({'calibrated' if info['calibrated'] else 'uncalibrated'})")
    print("config: " + json.dumps(info["config"], default=str))
    if metrics:
        print("metrics (model card):")
        print("\n".join(metrics))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from .wrapper import OCDWrapper

    model, tok = load_model(args.model, args.family)
    rows = to_rows(load_table(args.data), model, tok, args)
    train, val, test = split(rows, args.eval_fraction, args.seed)
    head = {"block_out_channels": tuple(args.channels)} if args.channels else {}
    ocd = OCDWrapper.from_pretrained(model, layer=args.layer, tokenizer=tok, **head)
    ocd.fit(
        train,
        loss=args.loss,
        eval_dataset=val,
        num_train_steps=args.steps,
        collect_batch_size=args.batch_size,
        train_batch_size=min(64, len(train)),
        seed=args.seed,
        progress=not args.quiet,
    )
    report = None
    if test is not None:
        from .evaluation import evaluate

        report = evaluate(ocd, test, num_samples=args.num_samples, seed=args.seed, progress=False)
        print(f"delta_scale chosen on {len(val)} held-out rows; evaluated on {len(test)} other held-out rows:")
        print(report.to_markdown())
    ocd.save_pretrained(args.output, evaluation=report)
    print(f"saved the OCD head for layer {ocd.config.layer} to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate
    from .hub import resolve_head_files
    from .serialization import read_record
    from .wrapper import OCDWrapper

    files = resolve_head_files(args.head, revision=args.revision)
    source = args.model or read_record(files.config, files.state).provenance.base_model
    model, tok = load_model(source, args.family)
    ocd = OCDWrapper.from_pretrained(model, args.head, revision=args.revision, tokenizer=tok)
    rows = to_rows(load_table(args.data), model, tok, args)
    report = evaluate(ocd, rows, num_samples=args.num_samples, seed=args.seed, progress=False)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.to_markdown())
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    folder = Path(args.head)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a head folder (ocd_config.json, ocd_state.json, ocd_head.safetensors).")

    def write(target: Path) -> None:
        shutil.copytree(folder, target)
        card = target / "README.md"
        if card.exists():  # the loading snippet names the Hub repo, not the local folder
            text = re.sub(
                r'from_pretrained\(model, "[^"]*"\)', f'from_pretrained(model, "{args.repo_id}")', card.read_text()
            )
            card.write_text(text)

    url = push_folder(
        args.repo_id,
        write,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.message,
        token=args.token,
    )
    print(url)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ocd-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="settings, layer, fingerprint, calibration and card metrics of a head")
    info.add_argument("head", help="head folder or Hub id")
    info.add_argument("--revision", default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)

    def data_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--family", choices=FAMILIES, default="auto", help="model family (default: from the folder)")
        q.add_argument("--text-column", default="text")
        q.add_argument("--label-column", default="label")
        q.add_argument("--max-length", type=int, default=128, help="tokens per text")
        q.add_argument("--num-samples", type=int, default=5, help="draws of the OCD ensemble rows")
        q.add_argument("--seed", type=int, default=0)

    fit = sub.add_parser("fit", help="fit a head for a model on a data file")
    fit.add_argument("model", help="model folder or Hub id")
    fit.add_argument("data", help=".csv / .jsonl / .parquet file or a datasets folder")
    fit.add_argument("--layer", default="auto", help="target layer name (default: auto)")
    fit.add_argument("--output", required=True, help="head folder to write")
    fit.add_argument("--loss", default=None, help="cross_entropy or mse (default: the family's)")
    fit.add_argument("--steps", type=int, default=2000, help="head training steps")
    fit.add_argument("--batch-size", type=int, default=32, help="samples overfitted together")
    fit.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        help="held out: half chooses delta_scale, the other half gives the evaluation table (0: none)",
    )
    fit.add_argument("--channels", type=int, nargs="+", default=None, help="denoiser block_out_channels")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    data_options(fit)
    fit.set_defaults(fn=cmd_fit)

    ev = sub.add_parser("evaluate", help="the evaluation table of a head on a data file")
    ev.add_argument("head", help="head folder or Hub id")
    ev.add_argument("data", help=".csv / .jsonl / .parquet file or a datasets folder")
    ev.add_argument("--model", default=None, help="base model (default: the one the head records)")
    ev.add_argument("--revision", default=None)
    ev.add_argument("--json", action="store_true")
    data_options(ev)
    ev.set_defaults(fn=cmd_evaluate)

    push = sub.add_parser("push", help="upload a head folder to a Hub repo in one commit")
    push.add_argument("head", help="head folder")
    push.add_argument("repo_id", help="user/name")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--message", default=None)
    push.add_argument("--token", default=None)
    push.set_defaults(fn=cmd_push)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (OSError, ValueError, ImportError) as e:  # bad paths, data or settings: their messages name the fix
        if args.traceback:
            raise
        print(f"ocd-hf {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
