"""`OCDConfig`: every setting of an OCD head, serialisable to `ocd_config.json`."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LAYOUTS = ("rows", "cols")
OPTIMIZERS = ("adam", "sgd")
TARGETS = ("full", "factored")


@dataclass
class OCDConfig:
    """Settings of one OCD head.

    Overfitting defaults follow the paper's official code (3 Adam steps at lr 5e-4 on the weight only).
    The denoiser predicts the clean sample by default: an epsilon-predicting denoiser collapsed on every
    CPU-sized run we measured (see docs/concepts.md).
    """

    layer: str | None = None
    # "classification" (probability-averaged ensembles) or "regression" (output-averaged)
    task: str | None = None
    loss: str | None = None
    # "full": generate the whole weight delta (the paper). "factored": generate u ∈ R^out with
    # Δ = u v̂ᵀ, v̂ the normalised layer input (Linear / Conv1D layers; see docs/factored.md)
    target: str = "full"
    # overfitting (Alg. 1)
    overfit_steps: int = 3
    overfit_lr: float = 5e-4
    overfit_optimizer: str = "adam"
    overfit_bias: bool = False
    # conditioning I(x): how token / spatial dims are pooled
    pooling: str = "mean"
    # diffusion
    prediction_type: str = "sample"
    num_train_timesteps: int = 1000
    num_inference_steps: int = 10
    beta_schedule: str = "linear"
    # classifier-free guidance: the conditioning is dropped with this probability while training, and
    # sampling mixes conditional and unconditional predictions, uncond + guidance_scale·(cond − uncond)
    cond_dropout: float = 0.0
    guidance_scale: float = 1.0
    # shrink applied to every generated delta (0 turns OCD off); `OCDWrapper.calibrate` picks it on
    # validation data so that the shipped head does not make the base model worse there
    delta_scale: float = 1.0
    # denoiser (diffusers UNet1DModel, Resnet blocks); layout "rows": weight rows are the sequence,
    # columns the channels (measured ~260x faster than one flat sequence on CPU, see docs/concepts.md)
    layout: str = "rows"
    block_out_channels: tuple[int, ...] = (64, 64, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    cond_hidden_dim: int = 128
    # scale net
    scale_hidden_dim: int = 128
    # training
    learning_rate: float = 1e-3
    train_batch_size: int = 64
    num_train_steps: int = 2000
    ema_decay: float = 0.995
    max_grad_norm: float = 1.0
    seed: int = 0
    # filled when the head is built (shapes of the target layer and the conditioning vectors)
    weight_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    input_dim: int | None = None
    activation_dim: int | None = None
    output_dim: int | None = None
    # provenance, filled by the wrapper
    base_model: str | None = None
    base_model_revision: str | None = None
    base_model_library: str | None = None
    layer_fingerprint: str | None = None
    target_std: float | None = None
    library_version: str | None = None
    # filled at save: the diffusers UNet1DModel and DDIM scheduler configs the head was built with
    denoiser_config: dict[str, Any] | None = None
    scheduler_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layer == "auto":
            # "auto" is resolved by selection before a config is stored; keep the marker only in memory.
            pass
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("overfit_optimizer", self.overfit_optimizer, OPTIMIZERS)
        _check_choice("target", self.target, TARGETS)
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}.")
        if self.delta_scale < 0:
            raise ValueError(f"delta_scale must be >= 0, got {self.delta_scale}.")
        if self.overfit_steps < 1:
            raise ValueError(f"overfit_steps must be >= 1, got {self.overfit_steps}.")
        self.block_out_channels = tuple(self.block_out_channels)
        if self.weight_shape is not None:
            self.weight_shape = tuple(self.weight_shape)
        if self.target_shape is not None:
            self.target_shape = tuple(self.target_shape)
        elif self.weight_shape is not None and self.target == "full":
            self.target_shape = self.weight_shape

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OCDConfig:
        """Build from a dict; keys this version does not know are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"OCDConfig: ignoring unknown keys {unknown} (written by a newer ocd_hf?)", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> OCDConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}.")
