"""`OCDConfig`: the settings of one OCD head, serialised as `ocd_config.json`.

Only what a user chooses lives here. What training finds out (shapes, the calibrated `delta_scale`,
the targets' spread) is in `ocd_hf.state`; how to run the training loop is `OCDTrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

PredictionType = Literal["epsilon", "sample", "v_prediction"]
Layout = Literal["rows", "cols"]
Optimizer = Literal["adam", "sgd"]
Target = Literal["full", "factored"]
Task = Literal["classification", "regression"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
Pooling = Literal["mean"]
Sampler = Literal["ddim", "distilled"]

AUTO = "auto"


class ConfigError(ValueError):
    """A setting with the wrong type or an out-of-range value; the message names the key and the file."""


@dataclass
class OCDConfig:
    """Settings of one OCD head.

    Overfitting defaults follow the paper's official code (3 Adam steps at lr 5e-4 on the weight only).
    The denoiser predicts the clean sample by default: an epsilon-predicting denoiser collapsed on every
    CPU-sized run we measured (docs/concepts.md).

    Args:
        layer: Name of the layer whose weight is generated (`model.get_submodule(layer)`), or "auto" to
            choose it by the paper's entropy criterion (docs/selection.md).
        task: "classification" (ensembles average probabilities) or "regression" (they average outputs).
            Filled from the loss when left unset.
        loss: "cross_entropy" or "mse"; a callable loss is given to `fit` instead and is not saved.
        target: "full" generates the whole weight delta (the paper); "factored" generates u ∈ R^out with
            Δ = u v̂ᵀ, v̂ the normalised layer input (docs/factored.md).
        overfit_steps: Optimizer steps per sample when collecting deltas (Alg. 1).
        overfit_lr: Learning rate of those steps.
        overfit_optimizer: "adam" or "sgd".
        overfit_bias: Also overfit the layer's bias (the paper does not).
        pooling: How token / spatial dims of the conditioning are pooled (docs/concepts.md).
        prediction_type: What the denoiser predicts: "sample" (x0), "epsilon" or "v_prediction".
        num_train_timesteps: Diffusion steps of the training schedule.
        num_inference_steps: DDIM steps when sampling with the diffusion model (`sampler="ddim"`).
        sampler: "ddim" runs `num_inference_steps` denoiser passes per draw; "distilled" runs the one-pass
            student made by `OCDWrapper.distill` (set by it; docs/concepts.md, "Sampling and distillation").
        beta_schedule: The diffusers beta schedule.
        cond_dropout: Probability of training the denoiser on the null condition (classifier-free guidance).
        guidance_scale: Sampling mixes uncond + guidance_scale·(cond − uncond); 1 is plain sampling.
        layout: How the weight matrix is laid out for the 1-D U-Net: "rows" (rows are the sequence, columns
            the channels) or "cols" (the transpose).
        block_out_channels: Channels of the U-Net's down blocks, or "auto": sized from the generated
            tensor when the head is built (`resolve_sizes`; docs/concepts.md, "Head size and training budget").
        layers_per_block: Resnet layers per U-Net block.
        norm_num_groups: GroupNorm groups in the U-Net.
        cond_hidden_dim: Hidden width of the conditioning encoders E_i, E_a, E_o, or "auto" (as above).
        scale_hidden_dim: Hidden width of the scale net ρ, or "auto" (as above).
    """

    layer: str | None = None
    task: Task | None = None
    loss: str | None = None
    target: Target = "full"
    overfit_steps: int = 3
    overfit_lr: float = 5e-4
    overfit_optimizer: Optimizer = "adam"
    overfit_bias: bool = False
    pooling: Pooling = "mean"
    prediction_type: PredictionType = "sample"
    num_train_timesteps: int = 1000
    num_inference_steps: int = 10
    sampler: Sampler = "ddim"
    beta_schedule: BetaSchedule = "linear"
    cond_dropout: float = 0.0
    guidance_scale: float = 1.0
    layout: Layout = "rows"
    block_out_channels: tuple[int, ...] | Literal["auto"] = AUTO
    layers_per_block: int = 1
    norm_num_groups: int = 8
    cond_hidden_dim: int | Literal["auto"] = AUTO
    scale_hidden_dim: int | Literal["auto"] = AUTO

    def __post_init__(self) -> None:
        if isinstance(self.block_out_channels, list):
            self.block_out_channels = tuple(self.block_out_channels)
        check_fields(self)
        channels = (1,) if self.block_out_channels == AUTO else self.block_out_channels
        ranges = {
            "overfit_steps": self.overfit_steps >= 1,
            "overfit_lr": self.overfit_lr > 0,
            "num_train_timesteps": self.num_train_timesteps >= 2,
            "num_inference_steps": 1 <= self.num_inference_steps <= self.num_train_timesteps,
            "cond_dropout": 0.0 <= self.cond_dropout < 1.0,
            "block_out_channels": len(channels) >= 1 and min(channels) >= 1,
            "layers_per_block": self.layers_per_block >= 1,
            "norm_num_groups": self.norm_num_groups >= 1
            and (self.block_out_channels == AUTO or all(c % self.norm_num_groups == 0 for c in channels)),
            "cond_hidden_dim": self.cond_hidden_dim == AUTO or self.cond_hidden_dim >= 1,
            "scale_hidden_dim": self.scale_hidden_dim == AUTO or self.scale_hidden_dim >= 1,
        }
        bad = [k for k, ok in ranges.items() if not ok]
        if bad:
            k = bad[0]
            raise ConfigError(f"OCDConfig.{k}={getattr(self, k)!r} is out of range ({RANGE_HINTS[k]}).")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "a config dict") -> OCDConfig:
        """Build from a dict; unknown keys are dropped with a warning, bad values raise naming `source`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"OCDConfig: ignoring unknown keys {unknown} in {source}.", stacklevel=2)
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> OCDConfig:
        """A copy with `changes` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)


RANGE_HINTS = {
    "overfit_steps": ">= 1",
    "overfit_lr": "> 0",
    "num_train_timesteps": ">= 2",
    "num_inference_steps": "between 1 and num_train_timesteps",
    "cond_dropout": "in [0, 1)",
    "block_out_channels": "'auto', or at least one block, each >= 1 channel",
    "layers_per_block": ">= 1",
    "norm_num_groups": ">= 1 and dividing every entry of block_out_channels",
    "cond_hidden_dim": "'auto' or >= 1",
    "scale_hidden_dim": "'auto' or >= 1",
}

# Generated tensors up to this many numbers get a U-Net of base width 16, then 32; larger ones get 64,
# the fixed default before sizing (docs/concepts.md, "Head size and training budget").
AUTO_WIDTHS = ((2048, 16), (16384, 32))
AUTO_MAX_WIDTH = 64


def auto_width(target_numel: int, norm_num_groups: int = 8) -> int:
    """Base width w of the auto-sized head for a generated tensor of `target_numel` numbers.

    The U-Net gets channels (w, w, 2w) and the conditioning encoders and scale net hidden width 2w.
    w is rounded up to a multiple of `norm_num_groups` (GroupNorm needs it).
    """
    w = next((width for limit, width in AUTO_WIDTHS if target_numel <= limit), AUTO_MAX_WIDTH)
    return -(-w // norm_num_groups) * norm_num_groups


def resolve_sizes(config: OCDConfig, target_shape: tuple[int, ...]) -> OCDConfig:
    """`config` with every "auto" network size replaced by its value for a generated tensor of `target_shape`.

    Sizes already given are kept, so a config resolved once (what a saved head stores) resolves to itself.
    """
    w = auto_width(math.prod(target_shape), config.norm_num_groups)
    changes: dict[str, Any] = {}
    if config.block_out_channels == AUTO:
        changes["block_out_channels"] = (w, w, 2 * w)
    for k in ("cond_hidden_dim", "scale_hidden_dim"):
        if getattr(config, k) == AUTO:
            changes[k] = 2 * w
    return config.replace(**changes) if changes else config


def check_fields(obj: Any) -> None:
    """Raise `ConfigError` for a dataclass field whose value does not match its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(
                f"{type(obj).__name__}.{f.name}={value!r} is not a valid value; expected {_describe(hints[f.name])}."
            )


def _matches(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        item = get_args(tp)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Any:
        return True
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + str(list(get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))
