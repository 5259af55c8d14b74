"""The model card written beside a head: Hub metadata, what the head does, its settings, results and how
to load it. Built from a `HeadRecord`; knows nothing of the wrapper."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .constants import CONFIG_NAME, HEAD_NAME, LIBRARY_NAME, STATE_NAME

CARD_TAGS = ["ocd", "diffusion", "weight-generation"]
HUB_LIBRARIES = ("transformers", "timm", "sentence-transformers", "setfit")


def hub_model_id(base_model: str | None, library: str | None) -> str | None:
    """`base_model` when it can be a Hub id (`owner/name` of a Hub library), else None.

    Plain PyTorch models carry a class name, and a model loaded from a local folder carries that folder's
    path: neither is a valid `base_model:` for the Hub.
    """
    if not base_model or library not in HUB_LIBRARIES:
        return None
    parts = base_model.split("/")
    if base_model.startswith(("/", ".", "~")) or len(parts) > 2 or any(not p for p in parts):
        return None
    return base_model


def build_model_card(record: Any, *, evaluation: Any = None, repo_id: str | None = None) -> ModelCard:
    """Model card for a head.

    Args:
        record: The head's `HeadRecord` (settings, shapes, provenance, fitted values).
        evaluation: An `EvaluationReport` whose table goes into the card.
        repo_id: Where the head will live (a Hub id or a folder), used in the loading snippet.
    """
    c, s, p, f = record.config, record.shapes, record.provenance, record.fitted
    metrics = list(next(iter(evaluation.rows.values()))) if evaluation is not None and evaluation.rows else None
    hub_id = hub_model_id(p.base_model, p.base_model_library)
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=hub_id, tags=list(CARD_TAGS), metrics=metrics)
    base = p.base_model or "the base model"
    # a model loaded from a local folder records its path; the card names the folder, not the machine's path
    short = base if hub_id or "/" not in base and "\\" not in base else f"{_basename(base)} (a local folder)"
    shape = "×".join(str(d) for d in s.weight_shape)
    if f.calibration is not None:
        cal = f.calibration
        calibrated = (
            f"yes, on {cal.get('num_samples', '?')} held-out samples (gain over base "
            f"{cal.get('gain_vs_base', float('nan')):.4g} ± {cal.get('gain_se', float('nan')):.2g} SE)"
        )
    else:
        calibrated = "no (delta_scale left at its default)"
    rows = [
        ("base model", f"`{base}`" + (f" @ `{p.base_model_revision}`" if p.base_model_revision else "")),
        ("base model library", p.base_model_library or "unknown"),
        ("layer", f"`{c.layer}` (weight {shape})"),
        ("layer fingerprint (sha256)", f"`{p.layer_fingerprint}`"),
        ("task / loss", f"{c.task or 'unknown'} / {c.loss or 'unknown'}"),
        (
            "delta_scale",
            f"{f.delta_scale:g}" + (" (OCD switched off: the base model's outputs)" if f.delta_scale == 0 else ""),
        ),
        ("calibrated", calibrated),
        ("overfitting", f"{c.overfit_steps} {c.overfit_optimizer} steps, lr {c.overfit_lr}, target {c.target}"),
        ("denoiser", f"UNet1DModel {list(c.block_out_channels)}, predicts {c.prediction_type}, layout {c.layout}"),
        ("sampling", f"DDIM, {c.num_inference_steps} of {c.num_train_timesteps} steps"),
        ("ocd_hf version", p.library_version or "unknown"),
    ]
    custom = p.conditioner != "mean"  # a head made with another conditioner loads only with that conditioner
    if custom:
        rows.insert(5, ("conditioning", f"conditioner `{p.conditioner}` (pass it again when loading)"))
    source = repo_id or "path/or/hub-id"
    if hub_id:
        load_model = f"model = ...  # {hub_id}, with the weights the head was trained on"
    else:
        load_model = f"model = ...  # {short}: the same architecture and weights the head was trained on"
    parts = [
        f"# OCD head for `{short}`, layer `{c.layer}`",
        "",
        "An OCD head (*Learning to Overfit with Conditional Diffusion Models*): for each input it generates a "
        f"weight update of layer `{c.layer}` with a conditional diffusion model and runs the base model with "
        "that per-sample weight. The base model itself is not part of this repository.",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
    ]
    if evaluation is not None and evaluation.rows:
        parts += [
            "",
            "## Evaluation",
            "",
            f"{evaluation.task}; ensembles draw {evaluation.num_samples} weight sets.",
            "",
            evaluation.to_markdown(),
        ]
    parts += [
        "",
        "## How to load",
        "",
        "```python",
        "from ocd_hf import OCDWrapper",
        "",
        load_model,
        f'ocd = OCDWrapper.from_pretrained(model, "{source}"'
        + (f", conditioner=...)  # the conditioner named {p.conditioner!r}" if custom else ")"),
        "outputs = ocd(inputs)                   # one generated weight set per sample",
        "ensemble = ocd(inputs, num_samples=5)   # average over 5 draws",
        "```",
        "",
        f"Files: `{CONFIG_NAME}` (settings), `{STATE_NAME}` (shapes, provenance, calibration), `{HEAD_NAME}` "
        "(denoiser, scale net and normalisation statistics).",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def _basename(path: str) -> str:
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
