"""Writing and reading a head folder, in the style of PEFT's save_and_load.

A head folder holds
- `ocd_config.json`: the settings (`OCDConfig`);
- `ocd_state.json`: shapes, provenance, fitted values, the diffusers configs the head was built with and
  the sha256 of `ocd_head.safetensors`;
- `ocd_head.safetensors`: `OCDHead.state_dict()` (denoiser, scale net, normalisation buffers);
- `README.md`: a model card.

Everything here works on a `HeadRecord` plus a state dict; nothing imports the wrapper. Heads are read
from safetensors only (pickle files are refused, never opened); every key that saving writes is
required when reading a current-format folder, and the tensors must match their recorded sha256. A
folder saved by ocd_hf 0.1 (one flat `ocd_config.json`) or before checksums (format 2) still loads, with
a warning that its tensors cannot be verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .config import AUTO, ConfigError, OCDConfig
from .constants import CONFIG_NAME, HEAD_NAME, MODEL_CARD_NAME, STATE_NAME
from .layers import layer_fingerprint, resolve_layer
from .manifest import model_fingerprint
from .state import FittedState, HeadShapes, Provenance, from_dict, to_dict
from .version import __version__

if TYPE_CHECKING:
    from .head import OCDHead

# The head and the sampling scheduler (hence diffusers) are imported only where a head is built or
# saved, so reading a head's records (`ocd-hf info`) stays cheap.

FORMAT_VERSION = 5
# Keys each format version added (dotted for the state's sections, bare for config keys and the state's
# top level); a folder of an older version may lack them. Every key saving writes is otherwise required,
# so a new OCDConfig / state field needs a FORMAT_VERSION bump and an entry here.
ADDED_IN_VERSION = {
    3: {"head_sha256", "provenance.model_fingerprint", "sampler", "fitted.distillation"},
    # the student's own size (None: the denoiser's); older readers would build the wrong student
    4: {"fitted.distillation.student_channels"},
    # the conditioner's name; older heads were all made by the mean pooling
    5: {"provenance.conditioner"},
}
HEAD_FILES = (CONFIG_NAME, STATE_NAME, HEAD_NAME, MODEL_CARD_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass
class HeadRecord:
    """Everything a head folder stores besides the tensors."""

    config: OCDConfig
    shapes: HeadShapes
    provenance: Provenance
    fitted: FittedState
    denoiser_config: dict[str, Any] | None = None
    scheduler_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    head_sha256: str | None = None
    format_version: int = FORMAT_VERSION

    def state_json(self) -> str:
        d = {
            "format_version": FORMAT_VERSION,
            "shapes": to_dict(self.shapes),
            "provenance": to_dict(self.provenance),
            "fitted": to_dict(self.fitted),
            "denoiser_config": self.denoiser_config,
            "scheduler_config": self.scheduler_config,
            "head_sha256": self.head_sha256,
        }
        return json.dumps(d, indent=2, sort_keys=True) + "\n"


def diffusers_config(obj: Any) -> dict[str, Any]:
    """A diffusers model/scheduler config as plain JSON values."""
    import diffusers

    cfg = {k: v for k, v in dict(obj.config).items() if k != "_use_default_values"}
    cfg = {"_class_name": type(obj).__name__, "_diffusers_version": diffusers.__version__, **cfg}
    return json.loads(json.dumps(cfg, default=list))


def with_diffusers_configs(record: HeadRecord, head: OCDHead) -> HeadRecord:
    """The record with the UNet and DDIM configs of `head` filled in (written at save)."""
    record.denoiser_config = diffusers_config(head.denoiser.unet)
    record.scheduler_config = diffusers_config(_sampling_scheduler(record.config))
    return record


# ---------------------------------------------------------------------------------------------- save
def make_record(
    config: OCDConfig,
    shapes: HeadShapes | None,
    provenance: Provenance,
    fitted: FittedState,
    head: OCDHead,
    model: torch.nn.Module | None,
) -> HeadRecord:
    """The record saved for a fitted head: provenance completed (layer and model fingerprints, version),
    diffusers configs added. `model` is the base model's module."""
    if model is None or shapes is None or config.layer in (None, AUTO):
        raise ValueError("Only a fitted OCDWrapper (resolved layer, known shapes) can be saved.")
    layer = model.get_submodule(config.layer)
    provenance = dataclasses.replace(
        provenance,
        layer_fingerprint=provenance.layer_fingerprint or layer_fingerprint(layer.weight),
        model_fingerprint=provenance.model_fingerprint or model_fingerprint(model),
        library_version=provenance.library_version or __version__,
    )
    return with_diffusers_configs(HeadRecord(config, shapes, provenance, dataclasses.replace(fitted)), head)


def save_head_folder(
    target: str | os.PathLike, record: HeadRecord, state_dict: dict[str, torch.Tensor], card: Any
) -> Path:
    """Write a head folder, all files or none (see `replace_folder`); `ocd_state.json` records the
    sha256 of the tensor file."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    data = save_bytes(state, metadata={"format": "pt"})
    record = dataclasses.replace(record, head_sha256=hashlib.sha256(data).hexdigest())

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(record.config.to_json_string(), encoding="utf-8")
        (folder / STATE_NAME).write_text(record.state_json(), encoding="utf-8")
        (folder / HEAD_NAME).write_bytes(data)
        card.save(folder / MODEL_CARD_NAME)

    return replace_folder(target, write)


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write` on a fresh sibling folder, then rename it to `target`.

    A crash leaves `target` absent or at its previous complete version, never half written; the next
    save (or load) of `target` cleans up after it (`recover_folder`). An existing `target` is replaced as
    a whole, so it may only contain head files: anything else is refused rather than deleted.
    """
    target = Path(target).absolute()
    recover_folder(target)
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
    # The pid in the name tells a later save whether the folder's owner is still running.
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.with_name(f".{target.name}.tmp-{tag}")
    old = target.with_name(f".{target.name}.old-{tag}")
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        # rename() cannot replace a non-empty folder: move the old one aside first, restore it on failure.
        # A kill between the two renames leaves both folders complete; recover_folder finishes the job.
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
    fsync_path(target.parent)
    return target


_SIDE_FOLDER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?(?P<tag>[0-9a-f]{8})$")


def recover_folder(target: str | os.PathLike) -> Path | None:
    """Clean up after saves of `target` that were killed; returns the folder restored as `target`, if any.

    Saving writes `.NAME.tmp-PID-TAG`, moves the previous head to `.NAME.old-PID-TAG` and renames the tmp
    folder to NAME. When `target` is missing and a dead save left an `.old-` folder, the new head (its
    tmp folder, complete since it is synced before the renames) or else the old head is renamed back to
    `target`, with a warning. Side folders of dead saves are then removed; those of running saves are kept.
    """
    target = Path(target).absolute()
    parent = target.parent
    if not parent.is_dir():
        return None
    side: dict[tuple[str, str], Path] = {}
    for p in parent.iterdir():
        m = _SIDE_FOLDER.match(p.name)
        if m and m["name"] == target.name and p.is_dir() and not _pid_alive(m["pid"]):
            side[(m["kind"], m["tag"])] = p
    restored = None
    if not target.exists():
        olds = sorted((p for (kind, _), p in side.items() if kind == "old"), key=_mtime, reverse=True)
        for old in olds:
            tag = _SIDE_FOLDER.match(old.name)["tag"]
            for candidate in (side.get(("tmp", tag)), old):
                if candidate is not None and {HEAD_NAME, CONFIG_NAME} <= {f.name for f in candidate.iterdir()}:
                    os.rename(candidate, target)
                    restored = candidate
                    break
            if restored:
                break
        if restored:
            warnings.warn(
                f"{target} was missing: a save was killed between its two renames. Restored the "
                f"{'new' if '.tmp-' in restored.name else 'previous'} head from {restored.name}.",
                RuntimeWarning,
                stacklevel=3,
            )
    for p in side.values():
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    return restored


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _pid_alive(pid: str | None) -> bool:
    """Whether process `pid` runs on this machine (folders named without a pid count as dead)."""
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def fsync_path(path: Path) -> None:
    """fsync a file or folder, ignoring file systems that cannot."""
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


# ---------------------------------------------------------------------------------------------- load
def refuse_pickles(files: list[str], where: str) -> None:
    """Raise when the only weight files are pickle-based (they are never opened)."""
    pickled = sorted({f for f in files if f.lower().endswith(PICKLE_SUFFIXES)})
    if pickled:
        raise ValueError(
            f"{where} has no {HEAD_NAME}, only pickle-based weight files {pickled}. ocd_hf loads heads from "
            "safetensors only: unpickling can run arbitrary code. Re-save the head with "
            "OCDWrapper.save_pretrained (safetensors is required)."
        )


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OSError(
            f"{path} is not valid JSON ({e}); the file is corrupted: re-download it (force_download=True)."
        ) from None
    if not isinstance(d, dict):
        raise OSError(f"{path} does not hold a JSON object; the file is corrupted.")
    return d


def read_record(config_path: str | os.PathLike, state_path: str | os.PathLike | None) -> HeadRecord:
    """`ocd_config.json` (+ `ocd_state.json`) -> HeadRecord; a 0.1 folder has no state file.

    Every key that `save_head_folder` writes must be present (a deleted key would otherwise fall back to
    a default and silently change outputs); errors name the file and the key.
    """
    raw = _read_json(config_path)
    if state_path is None:
        return _legacy_record(raw, str(config_path))
    d = _read_json(state_path)
    src = str(state_path)
    version = d.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 2 <= version <= FORMAT_VERSION:
        raise ConfigError(
            f"{src}: format_version {version!r} is not one this ocd_hf reads (2 to {FORMAT_VERSION}); "
            "upgrade ocd_hf, or re-save the head."
        )
    optional = {k for v, keys in ADDED_IN_VERSION.items() if v > version for k in keys}
    _require_keys(raw, [f.name for f in dataclasses.fields(OCDConfig)], str(config_path), "", optional)
    config = OCDConfig.from_dict(raw, source=str(config_path))
    top = ["shapes", "provenance", "fitted", "denoiser_config", "scheduler_config", "head_sha256"]
    _require_keys(d, top, src, "", optional)
    parts = {}
    for key, cls in (("shapes", HeadShapes), ("provenance", Provenance), ("fitted", FittedState)):
        if isinstance(d[key], dict):
            _require_keys(d[key], [f.name for f in dataclasses.fields(cls)], src, f"{key}.", optional)
        parts[key] = from_dict(cls, d[key], source=f"{src} ({key})")
    if parts["provenance"].layer_fingerprint is None:
        raise ConfigError(
            f"{src}: provenance.layer_fingerprint is null; saving always records it, so the file was edited. "
            "Without it the base-weight check is off: restore the file (re-download or re-save the head)."
        )
    if parts["fitted"].target_std is None:
        warnings.warn(
            f"{src}: fitted.target_std is null, so the sampling health check is off for this head.", stacklevel=3
        )
    sha = d.get("head_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise ConfigError(f"{src}: head_sha256={sha!r} is not a sha256 hex digest.")
    return HeadRecord(
        config=config,
        shapes=parts["shapes"],
        provenance=parts["provenance"],
        fitted=parts["fitted"],
        denoiser_config=d["denoiser_config"],
        scheduler_config=d["scheduler_config"],
        head_sha256=sha,
        format_version=version,
    )


def _require_keys(d: dict[str, Any], keys: list[str], src: str, prefix: str, optional: set[str]) -> None:
    missing = [prefix + k for k in keys if k not in d and prefix + k not in optional]
    if missing:
        raise ConfigError(
            f"{src} lacks {missing}: OCDWrapper.save_pretrained always writes "
            f"{'them' if len(missing) > 1 else 'it'}, so the file was edited or truncated. Restore it "
            "(re-download with force_download=True, or re-save the head); a missing value is never "
            "replaced by a default, since that would change the head's outputs."
        )


# The 0.1 flat config: which keys went where.
_LEGACY_SHAPES = ("weight_shape", "target_shape", "input_dim", "activation_dim", "output_dim")
_LEGACY_PROVENANCE = ("base_model", "base_model_revision", "base_model_library", "layer_fingerprint", "library_version")
_LEGACY_DROPPED = ("learning_rate", "train_batch_size", "num_train_steps", "ema_decay", "max_grad_norm", "seed")


_LEGACY_SIZES = {"block_out_channels": [64, 64, 128], "cond_hidden_dim": 128, "scale_hidden_dim": 128}


def _legacy_record(raw: dict[str, Any], src: str) -> HeadRecord:
    missing = [k for k in ("layer", "weight_shape", "input_dim", "activation_dim", "output_dim") if raw.get(k) is None]
    if missing:
        raise ConfigError(f"{src} lacks {missing}: it was not written by a fitted OCDWrapper.")
    # 0.1 built every head with these sizes; "auto" (today's default) would build another network
    raw = {**_LEGACY_SIZES, **raw}
    shapes = {k: raw.pop(k) for k in _LEGACY_SHAPES if k in raw}
    if shapes.get("target_shape") is None:
        shapes["target_shape"] = shapes["weight_shape"]
    provenance = {k: raw.pop(k) for k in _LEGACY_PROVENANCE if k in raw}
    extra = raw.pop("extra", None) or {}
    fitted = {
        "delta_scale": raw.pop("delta_scale", 1.0),
        "target_std": raw.pop("target_std", None),
        "calibration": extra.get("calibration"),
        "selection": extra.get("selection"),
        "collection": extra.get("collection"),
    }
    for k in _LEGACY_DROPPED:
        raw.pop(k, None)
    denoiser_config, scheduler_config = raw.pop("denoiser_config", None), raw.pop("scheduler_config", None)
    return HeadRecord(
        format_version=1,
        config=OCDConfig.from_dict(raw, source=src),
        shapes=from_dict(HeadShapes, shapes, source=src),
        provenance=from_dict(Provenance, provenance, source=src),
        fitted=from_dict(FittedState, fitted, source=src),
        denoiser_config=denoiser_config,
        scheduler_config=scheduler_config,
    )


def read_state_dict(
    path: str | os.PathLike, expected_sha256: str | None = None, *, verify_checksum: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors of `ocd_head.safetensors` on CPU, checked against the sha256 recorded at save.

    Args:
        path: The tensor file.
        expected_sha256: The digest from `ocd_state.json`; None for heads saved before checksums (a
            warning says the tensors cannot be verified).
        verify_checksum: False accepts a file whose digest differs (with a warning), e.g. a head whose
            tensors were edited on purpose.

    A damaged file raises OSError naming the remedy.
    """
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is None:
        warnings.warn(
            f"{path} has no recorded sha256 (saved by an older ocd_hf), so changes to its tensors cannot be "
            "detected. Re-save the head with this version to record one.",
            stacklevel=3,
        )
    elif digest != expected_sha256:
        msg = (
            f"{path} has sha256 {digest[:12]}…, but {STATE_NAME} records {expected_sha256[:12]}… for it: the file "
            "changed after it was saved (corrupted download, disk error or an edit)."
        )
        if verify_checksum:
            raise OSError(
                msg + " Download it again (from_pretrained(..., force_download=True) for a Hub head) or re-save "
                "the head; pass verify_checksum=False to load the changed tensors anyway."
            )
        warnings.warn(msg + " Loading anyway (verify_checksum=False).", stacklevel=3)
    try:
        state = load_bytes(data)
    except SafetensorError as e:
        raise OSError(
            f"{path} is corrupted or truncated ({e}). Delete it and download it again "
            "(from_pretrained(..., force_download=True) for a Hub head), or re-save the head."
        ) from None
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise OSError(f"{path} holds non-finite values in {bad[:5]}: the file is corrupted or the head diverged.")
    return state


def check_base_layer(record: HeadRecord, adapter: Any, where: str, *, allow_mismatch: bool = False) -> torch.nn.Module:
    """The target layer of the given model, refused unless it has the shape and weights the head was trained on."""
    config, shapes, prov = record.config, record.shapes, record.provenance
    given = adapter.describe().get("base_model") or type(adapter.module).__name__
    trained_for = (
        f"The head {where} was trained for layer {config.layer!r} of {prov.base_model or 'an unnamed model'} "
        f"(weight shape {tuple(shapes.weight_shape)})"
    )
    try:
        layer = resolve_layer(adapter.module, config.layer, adapter.candidate_layers)
    except ValueError as e:
        raise ValueError(f"{trained_for}, but the given model {given} has no such layer: {e}") from None
    shape = tuple(layer.weight.shape)
    if shape != tuple(shapes.weight_shape):
        raise ValueError(
            f"{trained_for}, but layer {config.layer!r} of the given model {given} has shape {shape}. "
            "A head only generates weights of the shape it was trained for; this cannot be overridden."
        )
    if prov.layer_fingerprint is not None:
        fp = layer_fingerprint(layer.weight)
        if fp != prov.layer_fingerprint:
            msg = (
                f"{trained_for}, with weights of sha256 {prov.layer_fingerprint[:12]}…, but the given model "
                f"{given} has different weights in that layer (sha256 {fp[:12]}…): its deltas were learned for "
                "other base weights."
            )
            if not allow_mismatch:
                raise ValueError(msg + " Pass allow_mismatch=True to load it anyway.")
            warnings.warn(msg + " Loading anyway (allow_mismatch=True).", stacklevel=4)
    if prov.model_fingerprint is not None:
        fp = model_fingerprint(adapter.module)
        if fp is not None and fp != prov.model_fingerprint:
            msg = (
                f"The head {where} was trained on {prov.base_model or 'a model'} with parameters of sha256 "
                f"{prov.model_fingerprint[:12]}…, but the given model {given} differs outside the target layer "
                f"(sha256 {fp[:12]}…): the conditioning comes from the whole model, so the head sees other inputs."
            )
            if not allow_mismatch:
                raise ValueError(msg + " Pass allow_mismatch=True to load it anyway.")
            warnings.warn(msg + " Loading anyway (allow_mismatch=True).", stacklevel=4)
    return layer


def build_head(record: HeadRecord, state: dict[str, torch.Tensor], where: str) -> OCDHead:
    """The head the record describes, with `state` loaded strictly (every tensor present, right shapes)."""
    # Building the head draws random initial weights; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        from .head import OCDHead

        head = OCDHead(record.config, record.shapes)
        if record.fitted.distillation is not None:  # a distilled head also stores its one-pass student
            d = record.fitted.distillation
            # heads of format 3 have no "student_channels": their student is the denoiser's size
            head.add_student(d.get("guidance_scale", 1.0), d.get("student_channels"))
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
    _check_diffusers_configs(record, head, where)
    return head.eval()


def _check_diffusers_configs(record: HeadRecord, head: OCDHead, where: str) -> None:
    """Warn when this installation builds the UNet / DDIM scheduler differently from the saving one."""
    pairs = [
        (record.denoiser_config, lambda: diffusers_config(head.denoiser.unet)),
        (record.scheduler_config, lambda: diffusers_config(_sampling_scheduler(record.config))),
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
                stacklevel=4,
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _sampling_scheduler(config: OCDConfig) -> Any:
    from .sampling import make_sampling_scheduler

    return make_sampling_scheduler(config)
