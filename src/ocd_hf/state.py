"""What a trained head knows besides its settings: the shapes it was built for, where it came from, and
what training and calibration found. Saved together as `ocd_state.json` beside `ocd_config.json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, check_fields


@dataclass(frozen=True)
class HeadShapes:
    """Shapes the head's networks are built for, read off the target layer and a collection.

    Args:
        weight_shape: Shape of the target layer's weight.
        target_shape: Shape of one generated tensor: the weight's, or (out, 1) for a factored target.
        input_dim: Width of the pooled layer input i_L.
        activation_dim: Width of the pooled layer output a_L.
        output_dim: Width of the pooled model output f(x).
    """

    weight_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    input_dim: int
    activation_dim: int
    output_dim: int

    def __post_init__(self) -> None:
        for k in ("weight_shape", "target_shape"):
            if isinstance(getattr(self, k), list):
                object.__setattr__(self, k, tuple(getattr(self, k)))
        check_fields(self)
        bad = [f.name for f in dataclasses.fields(self) if min(_ints(getattr(self, f.name))) < 1]
        if bad:
            raise ConfigError(f"HeadShapes.{bad[0]}={getattr(self, bad[0])!r} must be positive.")


@dataclass
class Provenance:
    """Which base model and exact layer weights a head belongs to.

    Args:
        base_model: Hub id or name of the base model (a class name for plain PyTorch models).
        base_model_revision: The base model's Hub revision, when known.
        base_model_library: "torch", "transformers", "timm", "sentence-transformers" or "setfit".
        layer_fingerprint: sha256 of the target layer's weight (float32 bytes).
        library_version: The ocd_hf version that trained the head.
        model_fingerprint: sha256 over every parameter and buffer of the base model (names, shapes and
            float32 bytes); None when the model was too large to hash cheaply at save.
        conditioner: Name of the conditioner that made the head's I(x) (`ocd_hf.conditioner`); loading
            refuses a head whose conditioner is not passed again. "mean" is the default mean pooling.
    """

    base_model: str | None = None
    base_model_revision: str | None = None
    base_model_library: str | None = None
    layer_fingerprint: str | None = None
    library_version: str | None = None
    model_fingerprint: str | None = None
    conditioner: str = "mean"

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class FittedState:
    """Values found by training and calibration.

    Args:
        delta_scale: Multiplies every generated delta; calibration picks it on validation data
            (0 switches OCD off, i.e. the base model).
        target_std: Spread of the training targets Δ/ρ; sampling health is judged against it.
        calibration: The calibration record (grid losses, gain over base and its standard error).
        selection: The layer-selection summary when the layer was chosen with layer="auto".
        collection: How the deltas were collected (given data or cross-fitted).
        distillation: How the one-pass student was distilled (method, teacher steps, guidance, loss);
            None when the head has no student.
    """

    delta_scale: float = 1.0
    target_std: float | None = None
    calibration: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    collection: dict[str, Any] | None = None
    distillation: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.delta_scale < 0:
            raise ConfigError(f"FittedState.delta_scale={self.delta_scale!r} must be >= 0.")
        if self.target_std is not None and not self.target_std > 0:
            raise ConfigError(f"FittedState.target_std={self.target_std!r} must be > 0.")


def to_dict(record: Any) -> dict[str, Any]:
    """A state record as plain JSON values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(record).items()}


def from_dict(cls: type, d: Any, *, source: str) -> Any:
    """Build `cls` from a dict, naming `source` and the key in every error."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected an object for {cls.__name__}, got {type(d).__name__}.")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown} for {cls.__name__} (written by a newer ocd_hf?).")
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in d]
    if required:
        raise ConfigError(f"{source}: {cls.__name__} lacks {required}.")
    try:
        return cls(**d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _ints(v: Any) -> tuple[int, ...]:
    return v if isinstance(v, tuple) else (v,)
