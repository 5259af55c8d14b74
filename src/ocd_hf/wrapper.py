"""`OCDWrapper`: a model plus an OCD head that generates per-sample weights for one of its layers.

The wrapper runs a head; `OCDTrainer` fits one. It never edits the model: hooks exist only during a
call, so `unload()` hands the model back unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from .capture import Conditioning, capture_layer
from .card import build_model_card
from .collection import DeltaStore
from .conditioner import Conditioner, condition, keeps_raw, resolve_conditioner
from .config import AUTO, OCDConfig
from .distillation import distill
from .ensemble import ENSEMBLES, combine_draws
from .head import OCDHead
from .health import check_conditioning
from .hub import push_folder
from .integrations import ModelAdapter, get_adapter
from .integrations.inputs import check_batch, check_call, check_resolved, reject_with_pretrained
from .layers import resolve_layer
from .loading import load_pretrained
from .losses import LossFn, resolve_loss
from .modes import eval_mode
from .per_sample import per_sample_weights
from .predict import PredictMixin
from .prefix import reuse_prefix
from .selection import AUTO_SELECTION, SelectionReport
from .serialization import make_record, save_head_folder
from .state import FittedState, HeadShapes, Provenance
from .trainer import OCDTrainer
from .training_args import pop_legacy_keys


class OCDWrapper(PredictMixin, nn.Module):
    """A model whose `layer` gets per-sample weights W + Δ(x) from a trained OCD head.

    The base model is a registered submodule: `.to()`, `.double()` and `.cuda()` move model and head together.

    Args:
        model: The base model (any family in `ocd_hf.integrations`).
        config: The head's settings.
        adapter: How to feed the model; found from the registry when None.
        head: A trained head; None until trained or loaded.
        shapes: The shapes `head` was built for.
        provenance: Which base model and layer weights `head` belongs to.
        state: Fitted values (`delta_scale`, `target_std`, calibration and selection records).
        conditioner: Makes I(x) from a forward pass (`ocd_hf.conditioner`); the mean pooling when None.
    """

    def __init__(
        self,
        model: Any,
        config: OCDConfig,
        *,
        adapter: ModelAdapter | None = None,
        head: OCDHead | None = None,
        shapes: HeadShapes | None = None,
        provenance: Provenance | None = None,
        state: FittedState | None = None,
        conditioner: Conditioner | None = None,
    ):
        super().__init__()
        self.adapter = adapter or get_adapter(model)
        self.base_model = self.adapter.module
        self.config = config
        if config.layer != AUTO:  # fail now, listing the candidates, on a missing or unsupported layer
            resolve_layer(self.module, config.layer, self.adapter.candidate_layers)
        self.head, self.shapes = head, shapes
        self.provenance = provenance or Provenance()
        self.state = state or FittedState()
        self.conditioner = resolve_conditioner(conditioner)
        self.loss_fn: LossFn | None = resolve_loss(config.loss) if config.loss else None
        self.selection_report: SelectionReport | None = None
        self.selection_kwargs: dict[str, Any] = {}
        self.training_defaults: dict[str, Any] = {}  # legacy from_pretrained(..., num_train_steps=...) keywords
        self.last_health = None
        # reuse what runs before the target layer across the passes of one call (ocd_hf.prefix); turn off
        # for models whose forward before the layer is not a pure function of the inputs
        self.reuse_prefix = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model: Any,
        pretrained_head: str | os.PathLike | None = None,
        *,
        layer: str | list[str] | None = None,
        config: OCDConfig | None = None,
        selection_data: Any = None,
        selection_kwargs: dict[str, Any] | None = None,
        tokenizer: Any = None,
        conditioner: Conditioner | None = None,
        **kwargs: Any,
    ) -> OCDWrapper:
        """Load a trained head onto `model`, or prepare a new one.

        With `pretrained_head` (a folder or a Hub id), `kwargs` go to `ocd_hf.loading.load_pretrained`
        (`revision`, `subfolder`, `token`, `cache_dir`, `allow_mismatch`, `num_inference_steps`, ...).
        Without it, `layer` names the target layer ("auto" or a list of names: chosen by the entropy
        criterion on `selection_data`, else on the first samples given to `fit`) and `kwargs` are
        `OCDConfig` fields. `tokenizer` (transformers models) lets the wrapper and `predict` take raw strings.
        `conditioner` makes I(x) (`ocd_hf.conditioner`; default the mean pooling); a loaded head needs the
        conditioner it was trained with.
        """
        adapter = get_adapter(model, tokenizer=tokenizer) if tokenizer is not None else None
        if pretrained_head is not None:
            reject_with_pretrained(layer=layer, config=config, selection_data=selection_data)
            loaded = load_pretrained(model, pretrained_head, conditioner=conditioner, **kwargs)
            return cls(**{**loaded, "adapter": adapter or loaded["adapter"]})
        legacy = pop_legacy_keys(kwargs)
        config = config.replace(**kwargs) if config is not None else OCDConfig(**kwargs)
        restrict = list(layer) if isinstance(layer, (list, tuple)) else None
        if layer is not None:
            config = config.replace(layer=AUTO if restrict else layer)
        ocd = cls(model, config, adapter=adapter, conditioner=conditioner)
        ocd.training_defaults = legacy
        extra = {"layer": restrict} if restrict else {}
        ocd.selection_kwargs = {**AUTO_SELECTION, **(selection_kwargs or {}), **extra}
        if selection_data is not None:
            if ocd.layer is not None:
                raise ValueError(f"selection_data needs layer='auto' or a list of layers; got layer={config.layer!r}.")
            ocd.select_layer(selection_data)
        return ocd

    @staticmethod
    def candidate_layers(model: Any) -> list[str]:
        """Names of the layers of `model` that OCD can generate weights for."""
        return list(get_adapter(model).candidate_layers())

    # ------------------------------------------------------------------ what is wrapped
    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def module(self) -> nn.Module:
        return self.adapter.module

    @property
    def layer(self) -> nn.Module | None:
        """The target layer; None while layer="auto" is unresolved."""
        return None if self.config.layer == AUTO else self.module.get_submodule(self.config.layer)

    @property
    def device(self) -> torch.device:
        return next(iter(self.module.parameters()), torch.empty(0)).device

    @property
    def delta_scale(self) -> float:
        """Multiplies every generated delta (chosen by calibration; 0 gives the base model)."""
        return self.state.delta_scale

    @delta_scale.setter
    def delta_scale(self, value: float) -> None:
        self.state = dataclasses.replace(self.state, delta_scale=float(value))

    def select_layer(self, data: Any, loss: str | LossFn | None = None, **kwargs: Any) -> SelectionReport:
        """Pick the target layer by Eq. 6 on `data` and use it from now on (`OCDTrainer.select_layer`)."""
        return OCDTrainer.from_kwargs(self, loss=loss).select_layer(data, **kwargs)

    # ------------------------------------------------------------------ training (OCDTrainer does it)
    def fit(self, train_dataset: Any, loss: Any = None, *, eval_dataset: Any = None, **kwargs: Any) -> OCDWrapper:
        """`OCDTrainer.from_kwargs(self, loss=loss, **kwargs).train(train_dataset, eval_dataset)`.

        kwargs: `cross_fit`, `accelerator` and `OCDTrainingArguments` fields (`batch_size` is `collect_batch_size`).
        """
        return OCDTrainer.from_kwargs(self, loss=loss, **kwargs).train(train_dataset, eval_dataset)

    def collect(self, dataset: Any, loss: Any = None, **kwargs: Any) -> DeltaStore:
        """Step 1 of fit: per-sample overfitting (`OCDTrainer.collect`); returns the `DeltaStore`."""
        return OCDTrainer.from_kwargs(self, loss=loss, **kwargs).collect(dataset)

    def train_head(self, store: DeltaStore, **kwargs: Any) -> list[dict[str, float]]:
        """Step 2 of fit: train denoiser and scale net on a collection (`OCDTrainer.train_head`)."""
        return OCDTrainer.from_kwargs(self, **kwargs).train_head(store)

    def calibrate(self, dataset: Any, *, batch_size: int = 256, **kwargs: Any) -> dict[str, Any]:
        """Step 3 of fit: choose `delta_scale` on held-out data (`OCDTrainer.calibrate`)."""
        return OCDTrainer.from_kwargs(self, calibration_batch_size=batch_size, **kwargs).calibrate(dataset)

    def distill(self, dataset: Any, **kwargs: Any) -> dict[str, Any]:
        """From now on one denoiser pass per draw: distil the DDIM sampler (`ocd_hf.distillation.distill`)."""
        return distill(self, dataset, **kwargs)

    def attach_head(self, head: OCDHead, shapes: HeadShapes, provenance: Provenance, *, target_std: float) -> None:
        """Use a freshly trained head (called by `OCDTrainer`); resets `delta_scale` to 1 until calibrated."""
        self.head, self.shapes, self.provenance = head, shapes, provenance
        self.config = self.config.replace(sampler="ddim")  # a new head has no student yet
        fitted = dict(target_std=target_std, delta_scale=1.0, calibration=None, distillation=None)
        self.state = dataclasses.replace(self.state, **fitted)

    def require_head(self) -> OCDHead:
        if self.head is None:
            raise RuntimeError(
                "This OCDWrapper has no trained head yet: call fit(...) or from_pretrained(model, path)."
            )
        return self.head

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def conditioning(self, inputs: Any) -> tuple[Conditioning, torch.Tensor]:
        """Run the unmodified model once; returns I(x) and the base output f(x)."""
        check_resolved(self.layer)
        with eval_mode(self.module) as module, capture_layer(self.layer, keeps_raw(self.conditioner)) as cap:
            out = self.adapter.forward(module, inputs)
            check_batch(inputs, cap.layer_input, out)  # the inputs; then what the model made of them (width, overflow)
            cond = condition(self.conditioner, cap, out)  # in eval mode, as the forward ran
        return check_conditioning(cond, self.shapes), out

    @torch.no_grad()
    def generate_deltas(
        self,
        cond: Conditioning,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        delta_scale: float | None = None,
    ) -> torch.Tensor:
        """delta_scale · ρ̂(I(x)) · Ω_0, Ω_0 from `config.sampler`: [num_samples, B, *weight_shape] ([.., B, out] if factored).

        delta_scale overrides the calibrated value for this call (1.0 gives the uncalibrated deltas). Raises on
        non-finite samples; warns when their spread leaves the targets' range (numbers in `self.last_health`).
        """
        scale = self.delta_scale if delta_scale is None else delta_scale
        delta, self.last_health = self.require_head().generate(
            cond, self.config, num_samples, generator, delta_scale=scale, target_std=self.state.target_std
        )
        return delta.to(self.layer.weight.dtype)

    @torch.no_grad()
    def forward_with_deltas(self, inputs: Any, delta: torch.Tensor) -> torch.Tensor:
        """Run the model with per-sample weights W + delta[b] (delta [B, *weight_shape], or u [B, out] when factored)."""
        layer = self.layer
        factor = None if tuple(delta.shape[1:]) == tuple(layer.weight.shape) else "auto"
        with eval_mode(self.module) as module, per_sample_weights(layer, delta, input_factor=factor):
            return self.adapter.forward(module, inputs)

    @torch.no_grad()
    def forward(
        self, inputs: Any, num_samples: int = 1, ensemble: str = "probs", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Model output with generated per-sample weights. With num_samples > 1, `ensemble` "probs" returns the log
        of the mean class probabilities (regression: mean output), "outputs" the mean raw output, "mean_weights"
        one run with the mean delta."""
        check_call(self.layer, num_samples)
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble={ensemble!r}; choose one of {list(ENSEMBLES)}.")
        with reuse_prefix(self.module, self.layer, self.reuse_prefix):
            cond, _ = self.conditioning(inputs)
            deltas = self.generate_deltas(cond, num_samples, generator)
            if ensemble == "mean_weights":
                deltas = deltas.mean(0, keepdim=True)
            outs = torch.stack([self.forward_with_deltas(inputs, d) for d in deltas])
        return outs[0] if outs.shape[0] == 1 else combine_draws(outs, self.config.task if ensemble == "probs" else None)

    # ------------------------------------------------------------------ sharing
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, evaluation: Any = None, repo_id: str | None = None
    ) -> str:
        """Write ocd_config.json, ocd_state.json, ocd_head.safetensors and a model card (all or nothing).

        `evaluation` (an `EvaluationReport`) goes into the card; `repo_id` names the head in its snippet.
        """
        record = make_record(self.config, self.shapes, self.provenance, self.state, self.require_head(), self.module)
        card = build_model_card(record, evaluation=evaluation, repo_id=repo_id or os.fspath(save_directory))
        return str(save_head_folder(save_directory, record, self.head.state_dict(), card))

    def push_to_hub(self, repo_id: str, *, evaluation: Any = None, **hub_kwargs: Any) -> str:
        """Upload the head to a Hub repo in one commit; returns the commit or PR URL.

        hub_kwargs: `private`, `revision` (a branch), `create_pr`, `commit_message`, `token`.
        """
        return push_folder(
            repo_id, lambda folder: self.save_pretrained(folder, evaluation=evaluation, repo_id=repo_id), **hub_kwargs
        )

    def unload(self) -> Any:
        """The base model, untouched (OCD's hooks exist only during calls)."""
        return self.model

    def __repr__(self) -> str:
        return describe(self)


def describe(ocd: OCDWrapper) -> str:
    """The wrapper's repr: base model, layer, head state and, when not the mean, the conditioner."""
    layer, c, st = ocd.layer, ocd.config, ocd.state
    where = f"{c.layer!r} ({type(layer).__name__} {tuple(layer.weight.shape)})" if layer is not None else "auto"
    head = "none (call fit, or from_pretrained(model, path))"
    if ocd.head is not None:
        cal = "calibrated" if st.calibration is not None else "uncalibrated"
        steps = "distilled one-pass sampler" if c.sampler == "distilled" else f"{c.num_inference_steps} DDIM steps"
        head = f"trained, delta_scale={st.delta_scale:g} ({cal}), {steps}"
    base = ocd.provenance.base_model or ocd.adapter.describe().get("base_model")
    cond = f"  conditioner={ocd.conditioner!r},\n" if keeps_raw(ocd.conditioner) else ""
    return f"OCDWrapper(\n  base_model={base!r} [{ocd.adapter.family}],\n  layer={where},\n{cond}  head={head}\n)"
