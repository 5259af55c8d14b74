"""Saving, loading and sharing OCD heads: a local folder or a Hub repo holding

- `ocd_config.json`: `OCDConfig.to_json_string()`, with the diffusers UNet/DDIM configs inside,
- `ocd_head.safetensors`: `OCDHead.state_dict()` (denoiser, scale net, normalisation buffers),
- `README.md`: a model card.

Heads are read from safetensors only (pickle files are refused, never opened) and are tied to the exact
base-model layer they were trained on by the weight's shape and sha256 fingerprint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import OCDConfig
from .constants import CONFIG_NAME, HEAD_NAME, LIBRARY_NAME, MODEL_CARD_NAME
from .head import OCDHead
from .integrations import get_adapter
from .sampling import make_sampling_scheduler
from .wrapper import layer_fingerprint, resolve_layer

if TYPE_CHECKING:
    from .evaluation import EvaluationReport
    from .wrapper import OCDWrapper

HEAD_FILES = (CONFIG_NAME, HEAD_NAME, MODEL_CARD_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CARD_TAGS = ["ocd", "diffusion", "weight-generation"]
DEFAULT_COMMIT_MESSAGE = "Upload OCD head"


# ---------------------------------------------------------------------------------------------- save
def save_head(
    wrapper: OCDWrapper,
    save_directory: str | os.PathLike,
    *,
    evaluation: EvaluationReport | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the wrapper's head into `save_directory`, all files or none (see `replace_folder`)."""
    head = wrapper._require_head()
    config = stored_config(wrapper)
    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    card = build_model_card(config, evaluation=evaluation, repo_id=repo_id or os.fspath(save_directory))

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        save_file(state, str(folder / HEAD_NAME), metadata={"format": "pt"})
        card.save(folder / MODEL_CARD_NAME)

    return replace_folder(save_directory, write)


def stored_config(wrapper: OCDWrapper) -> OCDConfig:
    """The config as written to `ocd_config.json`: provenance and the diffusers configs filled in."""
    from . import __version__

    config = wrapper.config
    if config.layer in (None, "auto") or config.weight_shape is None:
        raise ValueError("Only a fitted OCDWrapper (resolved layer, weight_shape set) can be saved.")
    head = wrapper._require_head()
    return config.replace(
        layer_fingerprint=config.layer_fingerprint or layer_fingerprint(wrapper.layer.weight),
        library_version=__version__,
        denoiser_config=diffusers_config(head.denoiser.unet),
        scheduler_config=diffusers_config(make_sampling_scheduler(config)),
    )


def diffusers_config(obj: Any) -> dict[str, Any]:
    """A diffusers model/scheduler config as plain JSON values."""
    import diffusers

    cfg = {k: v for k, v in dict(obj.config).items() if k != "_use_default_values"}
    cfg = {"_class_name": type(obj).__name__, "_diffusers_version": diffusers.__version__, **cfg}
    return json.loads(json.dumps(cfg, default=list))


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write` on a fresh sibling folder, then rename it to `target`.

    A crash leaves `target` absent or at its previous complete version, never half written. An existing
    `target` is replaced as a whole, so it may only contain head files: anything else is refused rather
    than deleted.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder.")
    if target.is_dir():
        foreign = sorted(p.name for p in target.iterdir() if p.name not in HEAD_FILES)
        if foreign:
            raise FileExistsError(
                f"{target} holds files that are not part of an OCD head ({foreign[:5]}); saving replaces the "
                "whole folder, so pick a new or empty folder (or remove those files)."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    old = target.with_name(f".{target.name}.old-{tag}")
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        # rename() cannot replace a non-empty folder: move the old one aside first, restore it on failure.
        if target.exists():
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if old.exists():
                os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)
    return target


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync folders
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- card
def _hub_model_id(config: OCDConfig) -> str | None:
    """The base model as a Hub id, if it is one (plain torch models only carry a class name)."""
    name = config.base_model
    if not name or (config.base_model_library in (None, "torch") and "/" not in name):
        return None
    return name


def build_model_card(
    config: OCDConfig, *, evaluation: EvaluationReport | None = None, repo_id: str | None = None
) -> ModelCard:
    """Model card: metadata for the Hub, what the head does, its settings, results and how to load it."""
    metrics = list(next(iter(evaluation.rows.values()))) if evaluation is not None and evaluation.rows else None
    data = ModelCardData(
        library_name=LIBRARY_NAME, base_model=_hub_model_id(config), tags=list(CARD_TAGS), metrics=metrics
    )
    base = config.base_model or "the base model"
    shape = "×".join(str(s) for s in config.weight_shape or ())
    rows = [
        ("base model", f"`{base}`" + (f" @ `{config.base_model_revision}`" if config.base_model_revision else "")),
        ("base model library", config.base_model_library or "unknown"),
        ("layer", f"`{config.layer}` (weight {shape})"),
        ("layer fingerprint (sha256)", f"`{config.layer_fingerprint}`"),
        ("task / loss", f"{config.task or 'unknown'} / {config.loss or 'unknown'}"),
        ("overfitting", f"{config.overfit_steps} {config.overfit_optimizer} steps, lr {config.overfit_lr}"),
        (
            "denoiser",
            f"UNet1DModel {list(config.block_out_channels)}, predicts {config.prediction_type}, layout {config.layout}",
        ),
        ("sampling", f"DDIM, {config.num_inference_steps} of {config.num_train_timesteps} steps"),
        ("training", f"{config.num_train_steps} steps, batch {config.train_batch_size}, lr {config.learning_rate}"),
        ("ocd_hf version", config.library_version or "unknown"),
    ]
    source = repo_id or "path/or/hub-id"
    parts = [
        f"# OCD head for `{base}`, layer `{config.layer}`",
        "",
        "An OCD head (*Learning to Overfit with Conditional Diffusion Models*): for each input it generates a "
        f"weight update of layer `{config.layer}` with a conditional diffusion model and runs the base model with "
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
        f"model = ...  # {base}, with the same weights the head was trained on",
        f'ocd = OCDWrapper.from_pretrained(model, "{source}")',
        "outputs = ocd(inputs)                   # one generated weight set per sample",
        "ensemble = ocd(inputs, num_samples=5)   # average over 5 draws",
        "```",
        "",
        f"Files: `{CONFIG_NAME}` (settings and provenance), `{HEAD_NAME}` (denoiser, scale net and "
        "normalisation statistics).",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


# ---------------------------------------------------------------------------------------------- push
def push_head(
    wrapper: OCDWrapper,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | bool | None = None,
    evaluation: EvaluationReport | None = None,
) -> str:
    """Create the repo (and branch `revision`) if needed and upload the head in one commit.

    Returns the commit URL, or the pull request's URL with `create_pr=True`.
    """
    if create_pr and revision not in (None, hf_constants.DEFAULT_REVISION):
        raise ValueError("create_pr=True opens a pull request against main; leave revision unset.")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, hf_constants.DEFAULT_REVISION):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ocd-push-") as tmp:
        folder = save_head(wrapper, Path(tmp) / "head", evaluation=evaluation, repo_id=repo_id)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            revision=revision,
            create_pr=create_pr,
        )
    return info.pr_url if create_pr and info.pr_url else info.commit_url


# ---------------------------------------------------------------------------------------------- load
def load_head(
    cls: type[OCDWrapper],
    model: Any,
    pretrained_head: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    allow_mismatch: bool = False,
    num_inference_steps: int | None = None,
) -> OCDWrapper:
    """Load a head from a local folder or a Hub repo and attach it to `model`.

    `allow_mismatch=True` accepts a base layer whose weights differ from the ones the head was trained on
    (same shape only). `num_inference_steps` overrides the stored number of DDIM steps.
    """
    config_path, head_path, where = resolve_head_files(
        pretrained_head,
        revision=revision,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
    )
    config = read_config(config_path)
    if num_inference_steps is not None:
        config = config.replace(num_inference_steps=num_inference_steps)
    adapter = get_adapter(model)
    layer = check_base_layer(config, adapter, where, allow_mismatch=allow_mismatch)
    state = read_state_dict(head_path)
    # Building the head draws random initial weights; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        head = OCDHead(config)
    _load_strict(head, state, where)
    _check_diffusers_configs(config, head, where)
    head.to(layer.weight.device).eval()
    return cls(model, config, adapter=adapter, head=head)


def resolve_head_files(
    pretrained_head: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> tuple[Path, Path, str]:
    """(config path, safetensors path, description) from a local folder, else from the Hub or its cache."""
    source = os.fspath(pretrained_head)
    # A local folder wins over a Hub id of the same name; hf_hub_download would reject the path anyway.
    if os.path.isdir(source):
        folder = Path(source, subfolder) if subfolder else Path(source)
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if HEAD_NAME not in files:
            _refuse_pickles(files, str(folder))
            raise FileNotFoundError(f"{folder} has no {HEAD_NAME}; it is not a saved OCD head (files: {files[:10]}).")
        if CONFIG_NAME not in files:
            raise FileNotFoundError(
                f"{folder} has {HEAD_NAME} but no {CONFIG_NAME}; the head cannot be rebuilt without it."
            )
        return folder / CONFIG_NAME, folder / HEAD_NAME, str(folder)

    from . import __version__

    where = source + (f"@{revision}" if revision else "") + (f" (subfolder {subfolder})" if subfolder else "")
    kwargs = dict(
        revision=revision,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        library_name=LIBRARY_NAME,
        library_version=__version__,
    )

    def fetch(filename: str, known: list[str]) -> str:
        try:
            return hf_hub_download(source, filename, **kwargs)
        except HFValidationError as e:
            raise ValueError(f"{source!r} is neither a local folder nor a valid Hub repo id ({e}).") from None
        except LocalEntryNotFoundError as e:
            offline = hf_constants.HF_HUB_OFFLINE or local_files_only
            _refuse_pickles(known + ([] if offline else _hub_listing(source, revision, subfolder, token)), where)
            raise FileNotFoundError(
                f"{filename} of {where} is not in the Hub cache ({cache_dir or hf_constants.HF_HUB_CACHE}) and "
                + (
                    "offline mode is on (HF_HUB_OFFLINE / local_files_only). "
                    if offline
                    else "the Hub could not be reached. "
                )
                + "Download it once while online, or pass a local folder."
            ) from e
        except EntryNotFoundError:
            files = known + _hub_listing(source, revision, subfolder, token)
            _refuse_pickles(files, where)
            raise FileNotFoundError(f"{where} has no {filename}; it is not a saved OCD head.") from None

    config_path = Path(fetch(CONFIG_NAME, []))
    # Files of this snapshot already in the cache: the only listing available offline.
    cached = sorted(p.name for p in config_path.parent.iterdir())
    head_path = Path(fetch(HEAD_NAME, cached))
    return config_path, head_path, where


def _hub_listing(repo_id: str, revision: str | None, subfolder: str | None, token: str | bool | None) -> list[str]:
    try:
        files = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # offline, missing repo, no permission: the listing is only used to explain an error
        return []
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [f[len(prefix) :] for f in files if f.startswith(prefix)]


def _refuse_pickles(files: list[str], where: str) -> None:
    pickled = sorted({f for f in files if f.lower().endswith(PICKLE_SUFFIXES)})
    if pickled:
        raise ValueError(
            f"{where} has no {HEAD_NAME}, only pickle-based weight files {pickled}. ocd_hf loads heads from "
            "safetensors only: unpickling can run arbitrary code. Re-save the head with "
            "OCDWrapper.save_pretrained (safetensors is required)."
        )


def read_config(path: str | os.PathLike) -> OCDConfig:
    """`ocd_config.json` -> OCDConfig (unknown keys are dropped with a warning)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OSError(
            f"{path} is not valid JSON ({e}); the file is corrupted: re-download it (force_download=True)."
        ) from None
    if not isinstance(d, dict):
        raise OSError(f"{path} does not hold a JSON object; the file is corrupted.")
    config = OCDConfig.from_dict(d)
    missing = [
        k for k in ("layer", "weight_shape", "input_dim", "activation_dim", "output_dim") if getattr(config, k) is None
    ]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it was not written by a fitted OCDWrapper.")
    return config


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of `ocd_head.safetensors` on CPU; a damaged file raises OSError naming the remedy."""
    try:
        state = load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise OSError(
            f"{path} is corrupted or truncated ({e}). Delete it and download it again "
            "(from_pretrained(..., force_download=True) for a Hub head), or re-save the head."
        ) from None
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise OSError(f"{path} holds non-finite values in {bad[:5]}: the file is corrupted or the head diverged.")
    return state


def check_base_layer(config: OCDConfig, adapter: Any, where: str, *, allow_mismatch: bool = False) -> torch.nn.Module:
    """The target layer of the given model, refused unless it has the shape and weights the head was trained on."""
    given = adapter.describe().get("base_model") or type(adapter.module).__name__
    trained_for = (
        f"The head {where} was trained for layer {config.layer!r} of {config.base_model or 'an unnamed model'} "
        f"(weight shape {tuple(config.weight_shape)})"
    )
    try:
        layer = resolve_layer(adapter, config.layer)
    except ValueError as e:
        raise ValueError(f"{trained_for}, but the given model {given} has no such layer: {e}") from None
    shape = tuple(layer.weight.shape)
    if shape != tuple(config.weight_shape):
        raise ValueError(
            f"{trained_for}, but layer {config.layer!r} of the given model {given} has shape {shape}. "
            "A head only generates weights of the shape it was trained for; this cannot be overridden."
        )
    if config.layer_fingerprint is not None:
        fp = layer_fingerprint(layer.weight)
        if fp != config.layer_fingerprint:
            msg = (
                f"{trained_for}, with weights of sha256 {config.layer_fingerprint[:12]}…, but the given model "
                f"{given} has different weights in that layer (sha256 {fp[:12]}…): its deltas were learned for "
                "other base weights."
            )
            if not allow_mismatch:
                raise ValueError(msg + " Pass allow_mismatch=True to load it anyway.")
            warnings.warn(msg + " Loading anyway (allow_mismatch=True).", stacklevel=3)
    return layer


def _load_strict(head: OCDHead, state: dict[str, torch.Tensor], where: str) -> None:
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{HEAD_NAME} of {where} does not match the head its config describes: "
            f"missing tensors {missing[:10]}{' …' if len(missing) > 10 else ''}, "
            f"unexpected tensors {extra[:10]}{' …' if len(extra) > 10 else ''}."
        )
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items() if v.shape != expected[k].shape
    ]
    if wrong:
        raise ValueError(f"{HEAD_NAME} of {where} has tensors of the wrong shape (file vs config): {wrong[:5]}.")
    head.load_state_dict(state, strict=True)


def _check_diffusers_configs(config: OCDConfig, head: OCDHead, where: str) -> None:
    """Warn when this installation builds the UNet / DDIM scheduler differently from the saving one."""
    pairs = [
        (config.denoiser_config, lambda: diffusers_config(head.denoiser.unet)),
        (config.scheduler_config, lambda: diffusers_config(make_sampling_scheduler(config))),
    ]
    for stored, current in pairs:
        if not stored:
            continue
        now = current()
        diff = sorted(k for k in stored.keys() & now.keys() if not k.startswith("_") and not _same(stored[k], now[k]))
        if diff:
            warnings.warn(
                f"The head {where} was saved with a different {now['_class_name']} config "
                f"({', '.join(f'{k}: {stored[k]!r} -> {now[k]!r}' for k in diff[:5])}); outputs may differ.",
                stacklevel=3,
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b
