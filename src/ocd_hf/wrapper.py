"""`OCDWrapper`: a model plus an OCD head that generates per-sample weights for one of its layers.

The wrapper never edits the model: hooks exist only during a call, so `unload()` simply hands the
model back unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset, Subset

from .capture import Conditioning, capture_layer, pool
from .collection import DeltaStore, collect_deltas
from .config import OCDConfig
from .head import OCDHead
from .health import check_samples
from .integrations import ModelAdapter, get_adapter
from .losses import LossFn, resolve_loss
from .modes import eval_mode
from .per_sample import check_supported, per_sample_weights
from .prefix import reuse_prefix
from .sampling import make_sampling_scheduler, sample_omega
from .selection import AUTO, SelectionReport
from .selection import select_layer as run_selection
from .training import train_head

if TYPE_CHECKING:
    from .evaluation import EvaluationReport

ENSEMBLES = ("probs", "mean_weights", "outputs")


def layer_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the layer's weight bytes (float32, CPU): ties a head to the exact base weights."""
    return hashlib.sha256(weight.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


class OCDWrapper(nn.Module):
    """Wrap `model`; after `fit`, calling the wrapper runs each sample with its own generated layer weights."""

    def __init__(self, model: Any, config: OCDConfig, adapter: ModelAdapter | None = None, head: OCDHead | None = None):
        super().__init__()
        self.adapter = adapter or get_adapter(model)
        self.config = config
        # layer="auto" stays unresolved (None) until select_layer runs: in from_pretrained when given
        # selection_data, else on the first samples of the data passed to fit / collect.
        self.layer = None if config.layer == AUTO else resolve_layer(self.adapter, config.layer)
        self.selection_report: SelectionReport | None = None
        self._selection_kwargs: dict[str, Any] = {}
        self.head = head
        self._loss_fn: LossFn | None = resolve_loss(config.loss) if config.loss else None
        # reuse what runs before the target layer across the passes of one call (ocd_hf.prefix); turn
        # off for models whose forward before the layer is not a pure function of the inputs
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
        **config_kwargs: Any,
    ) -> OCDWrapper:
        """Wrap `model` for OCD on `layer`, or load a trained head from a folder / Hub id.

        layer="auto" (or a list of names to choose from) picks the layer by the entropy criterion (see
        `select_layer`): right away on `selection_data` (a batch or a Dataset; needs loss=...), else on
        the first samples given to `fit`. `selection_kwargs` go to `ocd_hf.select_layer`.
        """
        if pretrained_head is not None:
            from .hub import load_head

            given = [
                n
                for n, v in (("layer", layer), ("config", config), ("selection_data", selection_data))
                if v is not None
            ]
            if given:
                raise ValueError(
                    f"{given} cannot be combined with a pretrained head: the head fixes its layer and settings "
                    "(see its ocd_config.json). Drop them, or build a new head without pretrained_head."
                )
            return load_head(cls, model, pretrained_head, **config_kwargs)
        config = config.replace(**config_kwargs) if config is not None else OCDConfig(**config_kwargs)
        restrict = list(layer) if isinstance(layer, (list, tuple)) else None
        if layer is not None:
            config = config.replace(layer=AUTO if restrict else layer)
        if config.layer is None:
            raise ValueError(
                "Name the layer to generate weights for, e.g. layer='fc1', or pass layer='auto' (see OCDWrapper.candidate_layers(model))."
            )
        ocd = cls(model, config)
        ocd._selection_kwargs = {**(selection_kwargs or {}), **({"layer": restrict} if restrict else {})}
        if selection_data is not None:
            if ocd.layer is not None:
                raise ValueError(
                    f"selection_data is used only with layer='auto' or a list of layers; got layer={config.layer!r}."
                )
            ocd.select_layer(selection_data)
        return ocd

    @staticmethod
    def candidate_layers(model: Any) -> list[str]:
        return list(get_adapter(model).candidate_layers())

    @property
    def model(self) -> Any:
        return self.adapter.model

    @property
    def module(self) -> nn.Module:
        return self.adapter.module

    @property
    def device(self) -> torch.device:
        if self.layer is None:
            return next(iter(self.module.parameters()), torch.empty(0)).device
        return self.layer.weight.device

    # ------------------------------------------------------------------ layer selection
    def select_layer(self, data: Any, loss: str | LossFn | None = None, **kwargs: Any) -> SelectionReport:
        """Pick the target layer by Eq. 6 on `data` (a batch or a Dataset) and use it from now on.

        kwargs go to `ocd_hf.select_layer` (num_perturbations, sigma, max_samples, layer=[names], ...).
        The report is kept in `self.selection_report`; config.layer becomes the winner's name.
        """
        if loss is not None or self._loss_fn is None:
            self._loss_fn, fields = self._resolve_loss(loss)
            self.config = self.config.replace(**fields)
        kwargs = {"seed": self.config.seed, **self._selection_kwargs, **kwargs}
        report = run_selection(self.model, data, self._loss_fn, adapter=self.adapter, **kwargs)
        self.layer = resolve_layer(self.adapter, report.winner)
        self.config = self.config.replace(
            layer=report.winner, extra={**self.config.extra, "selection": report.summary()}
        )
        self.selection_report = report
        return report

    # ------------------------------------------------------------------ training
    def fit(
        self,
        train_dataset: Dataset,
        loss: str | LossFn | None = None,
        *,
        batch_size: int = 64,
        collect_dir: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        num_train_steps: int | None = None,
        cross_fit: Callable[[Dataset], Any] | None = None,
        num_folds: int = 5,
        eval_dataset: Dataset | None = None,
        shard_size: int = 4096,
        resume: bool = True,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ) -> OCDWrapper:
        """Overfit every sample (streamed to `collect_dir`), then train the head on the deltas.

        Deltas carry the base model's real errors only on samples it was not trained on: pass a held-out
        split as `train_dataset`, or pass `cross_fit=train_fn` to collect K-fold out-of-fold deltas on
        the training set (see `collect`). With `eval_dataset` (held-out, labelled) the head's
        delta_scale is then chosen on it (`calibrate`), which switches OCD off where it does not help.
        """
        accelerator = accelerator or Accelerator()
        with contextlib.ExitStack() as stack:
            if collect_dir is None:  # the deltas are only needed until the head is trained
                collect_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="ocd-collect-"))
            store = self.collect(
                train_dataset,
                loss,
                batch_size=batch_size,
                collect_dir=collect_dir,
                shard_size=shard_size,
                cross_fit=cross_fit,
                num_folds=num_folds,
                accelerator=accelerator,
                progress=progress,
            )
            if num_train_steps is not None:
                self.config = self.config.replace(num_train_steps=num_train_steps)
            self.train_head(store, output_dir=output_dir, resume=resume, accelerator=accelerator, progress=progress)
        if eval_dataset is not None:
            self.calibrate(
                eval_dataset,
                batch_size=max(batch_size, 256),
                seed=self.config.seed,
                progress=progress and accelerator.is_main_process,
            )
        elif accelerator.is_main_process:
            warnings.warn(
                "fit() without eval_dataset leaves the head uncalibrated (delta_scale=1.0). In our benchmarks "
                "uncalibrated heads were often no better or worse than the base model (docs/findings.md); pass "
                "held-out labelled data as eval_dataset=..., or call ocd.calibrate(val_dataset) before shipping the head.",
                UserWarning,
                stacklevel=2,
            )
        return self

    def collect(
        self,
        dataset: Dataset,
        loss: str | LossFn | None = None,
        *,
        batch_size: int = 64,
        collect_dir: str | os.PathLike | None = None,
        shard_size: int = 4096,
        cross_fit: Callable[[Dataset], Any] | None = None,
        num_folds: int = 5,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ) -> DeltaStore:
        """Step 1 of fit: per-sample overfitting of the target layer on `dataset`.

        cross_fit: `train_fn(subset) -> model` (or its state dict) that trains a fresh base model the way
        the wrapped one was trained. The data is split into `num_folds` folds; fold k's deltas and I(x)
        come from a model trained on the other folds, so they carry out-of-sample errors. Costs
        `num_folds` base trainings; the wrapped model is restored afterwards. Under accelerate the
        folds are shared out between processes.
        """
        loss_fn, loss_fields = self._resolve_loss(loss)
        if self.layer is None:  # layer="auto" without selection_data: select on the first samples
            self.select_layer(dataset, loss)
        if collect_dir is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="ocd-collect-")
            collect_dir = self._tmpdir.name
        pi, np_ = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        if cross_fit is None:
            self._collect_into(dataset, loss_fn, collect_dir, batch_size, shard_size, progress, pi, np_)
            paths: str | list[Path] = collect_dir
            mode = {"mode": "given data"}
        else:
            paths = self._cross_fit_collect(
                dataset, loss_fn, Path(collect_dir), cross_fit, num_folds, batch_size, shard_size, progress, pi, np_
            )
            mode = {"mode": "cross_fit", "num_folds": num_folds}
        if accelerator is not None:
            accelerator.wait_for_everyone()
        self._loss_fn = loss_fn
        self.config = self.config.replace(**loss_fields, extra={**self.config.extra, "collection": mode})
        return DeltaStore(paths)

    def _collect_into(
        self,
        dataset: Dataset,
        loss_fn: LossFn,
        out: Any,
        batch_size: int,
        shard_size: int,
        progress: bool,
        pi: int,
        np_: int,
    ) -> None:
        c = self.config
        collect_deltas(
            self.module,
            c.layer,
            dataset,
            loss_fn,
            out,
            split_batch=self.adapter.split_batch,
            forward_fn=self.adapter.forward,
            collate_fn=self.adapter.collate_fn(),
            to_device=lambda b: self.adapter.to_device(b, self.device),
            steps=c.overfit_steps,
            lr=c.overfit_lr,
            optimizer=c.overfit_optimizer,
            include_bias=c.overfit_bias,
            target=c.target,
            batch_size=batch_size,
            shard_size=shard_size,
            progress=progress,
            process_index=pi,
            num_processes=np_,
        )

    def _cross_fit_collect(
        self,
        dataset: Dataset,
        loss_fn: LossFn,
        root: Path,
        train_fn: Callable[[Dataset], Any],
        num_folds: int,
        batch_size: int,
        shard_size: int,
        progress: bool,
        pi: int,
        np_: int,
    ) -> list[Path]:
        n = len(dataset)
        if not 2 <= num_folds <= n:
            raise ValueError(f"num_folds must be between 2 and the dataset size ({n}); got {num_folds}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed)).tolist()
        folds = [sorted(order[k::num_folds]) for k in range(num_folds)]
        paths = [root / f"fold-{k}" for k in range(num_folds)]
        original = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        try:
            for k in range(pi, num_folds, np_):
                if _complete(paths[k]):  # resume: this fold's base model need not be retrained
                    continue
                rest = [i for j, f in enumerate(folds) if j != k for i in f]
                fitted = train_fn(_subset(dataset, rest))
                state = fitted if isinstance(fitted, dict) else get_adapter(fitted).module.state_dict()
                self.module.load_state_dict(state)
                self._collect_into(
                    _subset(dataset, folds[k]), loss_fn, paths[k], batch_size, shard_size, progress, 0, 1
                )
        finally:
            self.module.load_state_dict(original)
        return paths

    def train_head(
        self,
        store: DeltaStore,
        *,
        output_dir: str | os.PathLike | None = None,
        resume: bool = True,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ) -> list[dict[str, float]]:
        """Step 2 of fit: train denoiser and scale net on a finished collection."""
        if self.layer is None:
            raise RuntimeError("layer='auto' is not resolved yet: call select_layer(data) or collect(dataset) first.")
        if store.target != self.config.target:
            raise ValueError(
                f"The collection holds target={store.target!r} deltas but the config asks for target={self.config.target!r}."
            )
        if tuple(store.weight_shape) != tuple(self.layer.weight.shape):
            raise ValueError(
                f"Collection targets a {store.weight_shape} weight but layer {self.config.layer!r} is {tuple(self.layer.weight.shape)}."
            )
        sample = store[0]
        info = self.adapter.describe()
        self.config = self.config.replace(
            weight_shape=tuple(self.layer.weight.shape),
            target_shape=store.target_shape,
            input_dim=sample["layer_input"].numel(),
            activation_dim=sample["layer_output"].numel(),
            output_dim=sample["model_output"].numel(),
            layer_fingerprint=layer_fingerprint(self.layer.weight),
            base_model=self.config.base_model or info["base_model"],
            base_model_library=info["base_model_library"],
        )
        torch.manual_seed(self.config.seed)
        self.head = OCDHead(self.config)
        self.history = train_head(
            self.head,
            store,
            self.config,
            output_dir=output_dir,
            resume=resume,
            accelerator=accelerator,
            progress=progress,
        )
        self.head.to(self.device)
        omega = store.get_batch(range(min(len(store), 2048)))
        self.config = self.config.replace(
            target_std=float((omega["delta"].flatten(1) / omega["scale"][:, None].clamp_min(1e-12)).std())
        )
        return self.history

    @torch.no_grad()
    def calibrate(
        self,
        dataset: Dataset,
        *,
        grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
        min_gain_se: float = 2.0,
        batch_size: int = 256,
        seed: int = 0,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Choose `delta_scale` on held-out data the base model was not trained on (step 3 of fit).

        Each grid value scales the same generated deltas; the one with the lowest mean loss wins, but
        only if it beats the base model (delta_scale 0) by `min_gain_se` standard errors of the paired
        per-sample loss difference, else 0: a head that does not help on validation is switched off
        instead of shipped. Sets config.delta_scale and returns the per-value mean losses.
        """
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        self._require_head()
        if self._loss_fn is None:
            raise RuntimeError("No loss known: call fit(...) first, or pass loss= to from_pretrained.")
        grid = tuple(sorted(set(float(g) for g in grid) | {0.0}))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        losses: dict[float, list[torch.Tensor]] = {g: [] for g in grid}
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.adapter.collate_fn())
        for batch in tqdm(loader, desc="calibrating delta_scale", disable=not progress):
            inputs, targets = self.adapter.split_batch(self.adapter.to_device(batch, self.device))
            with reuse_prefix(self.module, self.layer, self.reuse_prefix):
                cond, base_out = self.conditioning(inputs)
                delta = self.generate_deltas(cond, 1, gen, delta_scale=1.0)[0]
                for g in grid:
                    out = base_out if g == 0 else self.forward_with_deltas(inputs, g * delta)
                    losses[g].append(self._loss_fn(out, targets).double().cpu())
        per = {g: torch.cat(v) for g, v in losses.items()}
        mean = {g: float(v.mean()) for g, v in per.items()}
        best = min(grid, key=lambda g: (mean[g], g))
        diff = per[best] - per[0.0]
        se = float(diff.std() / max(len(diff), 1) ** 0.5) if len(diff) > 1 else float("inf")
        chosen = best if best > 0 and float(diff.mean()) < -min_gain_se * se else 0.0
        result = {
            "delta_scale": chosen,
            "mean_loss": {str(g): m for g, m in mean.items()},
            "best": best,
            "gain_vs_base": -float(diff.mean()),
            "gain_se": se,
            "num_samples": len(diff),
        }
        self.config = self.config.replace(delta_scale=chosen, extra={**self.config.extra, "calibration": result})
        return result

    def _resolve_loss(self, loss: str | LossFn | None) -> tuple[LossFn, dict[str, str]]:
        """The loss function and the config fields it implies (applied only once collection succeeds)."""
        loss = loss if loss is not None else (self.config.loss or self.adapter.default_loss)
        if loss is None:
            raise ValueError(
                "Pass loss='cross_entropy', loss='mse' or a callable(output, target) -> per-sample loss [B]."
            )
        fields = {}
        if isinstance(loss, str):
            fields = {
                "loss": loss,
                "task": self.config.task or ("classification" if loss == "cross_entropy" else "regression"),
            }
        return resolve_loss(loss), fields

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def conditioning(self, inputs: Any) -> tuple[Conditioning, torch.Tensor]:
        """Run the unmodified model once; returns I(x) and the base output f(x)."""
        with eval_mode(self.module) as module, capture_layer(self.layer) as cap:
            out = self.adapter.forward(module, inputs)
        return Conditioning(cap.layer_input, cap.layer_output, pool(out)), out

    @torch.no_grad()
    def generate_deltas(
        self,
        cond: Conditioning,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        delta_scale: float | None = None,
    ) -> torch.Tensor:
        """delta_scale · ρ̂(I(x)) · Ω_0 with Ω_0 from DDIM; returns [num_samples, B, *weight_shape] ([.., B, out] when factored).

        delta_scale: overrides config.delta_scale for this call (1.0 gives the uncalibrated deltas).

        Raises on non-finite samples and warns when their spread leaves the training targets' range
        (`self.last_health` keeps the numbers of the last call).
        """
        head = self._require_head()
        head.eval()
        normed = head.normalize(cond)
        omega = sample_omega(
            head.denoiser,
            normed,
            make_sampling_scheduler(self.config),
            self.config.num_inference_steps,
            num_samples,
            generator,
            guidance_scale=self.config.guidance_scale,
        )
        self.last_health = check_samples(omega, self.config.target_std)
        scale = head.scale_net(normed) * (self.config.delta_scale if delta_scale is None else delta_scale)
        delta = omega * scale.view(1, -1, *([1] * (omega.dim() - 2)))
        if self.config.target == "factored":
            delta = delta.squeeze(-1)
        if not torch.isfinite(delta).all():
            raise FloatingPointError(
                "The head's scale net gave non-finite deltas; it has likely diverged (retrain it with a lower learning_rate)."
            )
        return delta.to(self.layer.weight.dtype)

    @torch.no_grad()
    def forward_with_deltas(self, inputs: Any, delta: torch.Tensor) -> torch.Tensor:
        """Run the model with per-sample weights W + delta[b] (delta [B, *weight_shape], or u [B, out] when factored)."""
        # a [B, out] delta is a factored one (u, with v̂ from the layer input); [B, *W.shape] is full
        factor = None if tuple(delta.shape[1:]) == tuple(self.layer.weight.shape) else "auto"
        with eval_mode(self.module) as module, per_sample_weights(self.layer, delta, input_factor=factor):
            return self.adapter.forward(module, inputs)

    @torch.no_grad()
    def forward(
        self,
        inputs: Any,
        num_samples: int = 1,
        ensemble: str = "probs",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Model output with generated per-sample weights.

        With num_samples > 1: "probs" returns log of the averaged class probabilities (so softmax of the
        result is the ensemble's probability; regression heads average outputs), "outputs" averages the
        raw outputs, "mean_weights" runs once with the average of the drawn deltas.
        """
        if ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble={ensemble!r}; choose one of {list(ENSEMBLES)}.")
        with reuse_prefix(self.module, self.layer, self.reuse_prefix):
            cond, _ = self.conditioning(inputs)
            deltas = self.generate_deltas(cond, num_samples, generator)
            if ensemble == "mean_weights":
                deltas = deltas.mean(0, keepdim=True)
            outs = torch.stack([self.forward_with_deltas(inputs, d) for d in deltas])
        if outs.shape[0] == 1:
            return outs[0]
        return combine_draws(outs, self.config.task if ensemble == "probs" else None)

    @torch.no_grad()
    def predict_proba(
        self, inputs: Any, num_samples: int = 1, batch_size: int = 32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Class probabilities with generated weights, in batches; raw strings work for SetFit / sentence-transformers.

        A single string gives one row's probabilities, like SetFitModel.predict_proba.
        """
        from .integrations.base import iter_batches

        single = isinstance(inputs, str)
        batches = iter_batches([inputs] if single else inputs, batch_size)
        probs = torch.cat(
            [self(self.adapter.prepare_inputs(b), num_samples, generator=generator).softmax(-1) for b in batches]
        )
        return probs[0] if single else probs

    def predict(
        self, inputs: Any, num_samples: int = 1, batch_size: int = 32, generator: torch.Generator | None = None
    ) -> Any:
        """Predicted classes (SetFit: its labels, as SetFitModel.predict returns them)."""
        single = isinstance(inputs, str)
        preds = self.adapter.decode(
            self.predict_proba([inputs] if single else inputs, num_samples, batch_size, generator).argmax(-1)
        )
        return preds[0] if single else preds

    # ------------------------------------------------------------------ sharing
    def save_pretrained(self, save_directory: str | os.PathLike, *, evaluation: EvaluationReport | None = None) -> str:
        """Write ocd_config.json, ocd_head.safetensors and a model card (with `evaluation` if given) to a folder."""
        from .hub import save_head

        return str(save_head(self, save_directory, evaluation=evaluation))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        commit_message: str | None = None,
        token: str | bool | None = None,
        evaluation: EvaluationReport | None = None,
    ) -> str:
        """Upload the head to a Hub repo (branch `revision`) in one commit; returns the commit or PR URL."""
        from .hub import push_head

        return push_head(
            self,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            token=token,
            evaluation=evaluation,
        )

    def _require_head(self) -> OCDHead:
        if self.head is None:
            raise RuntimeError(
                "This OCDWrapper has no trained head yet: call fit(...) or load one with from_pretrained(model, path)."
            )
        return self.head

    def unload(self) -> Any:
        """The base model, untouched (OCD's hooks exist only during calls)."""
        return self.model


def combine_draws(outs: torch.Tensor, task: str | None) -> torch.Tensor:
    """[S, B, ...] outputs of S draws -> one: log of the mean class probability for classification, else the mean."""
    if task == "classification":
        return outs.log_softmax(-1).exp().mean(0).log()
    return outs.mean(0)


def resolve_layer(adapter: ModelAdapter, name: str | None) -> nn.Module:
    """The module named `name`, checked to be a layer OCD supports."""
    if name is None:
        raise ValueError("No target layer given.")
    module = adapter.module
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        cands = list(adapter.candidate_layers())
        raise ValueError(f"No layer named {name!r} in {type(module).__name__}. Candidate layers: {cands}") from None
    check_supported(layer, name)
    return layer


def _subset(dataset: Any, indices: list[int]) -> Any:
    # HF datasets keep their own type (trainers such as SetFit's expect one); anything else is a Subset
    return (
        dataset.select(indices)
        if hasattr(dataset, "select") and hasattr(dataset, "column_names")
        else Subset(dataset, indices)
    )


def _complete(folder: Path) -> bool:
    try:
        DeltaStore(folder)
    except (FileNotFoundError, ValueError):
        return False
    return True
