"""`OCDTrainer`: collection, cross-fitting, head training and calibration of an `OCDWrapper`.

Modelled on transformers' `Trainer`: the wrapper only runs a head; the trainer fits one.

    trainer = OCDTrainer(ocd, OCDTrainingArguments(num_train_steps=1000), loss="cross_entropy")
    trainer.train(train_dataset, eval_dataset=val_dataset)
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from .calibration import calibrate
from .collection import DeltaStore, collect_deltas
from .conditioner import check_collection
from .config import resolve_sizes
from .cross_fit import cross_fit_collect
from .head import OCDHead
from .layers import layer_fingerprint, warn_if_large
from .losses import LossFn, resolve_loss
from .overfit import OverfitSettings
from .selection import SelectionReport, select_layer
from .state import HeadShapes, Provenance
from .training import train_head
from .training_args import OCDTrainingArguments
from .version import __version__


class OCDTrainer:
    """Fits the head of an `OCDWrapper`: overfit every sample, train denoiser and scale net, calibrate.

    Args:
        ocd: The wrapper whose head is trained (its model is never modified for good).
        args: How to collect, train and calibrate; defaults when None.
        loss: "cross_entropy", "mse" or a callable(output, target) -> per-sample loss [B]; defaults to
            the wrapper's config.loss, else the model family's default.
        cross_fit: `train_fn(subset) -> model` (or its state dict) that trains a fresh base model the way
            the wrapped one was trained; fold k's deltas then come from a model that never saw fold k.
        accelerator: Runs collection and training (one or several processes); a default one when None.
    """

    def __init__(
        self,
        ocd: Any,
        args: OCDTrainingArguments | None = None,
        *,
        loss: str | LossFn | None = None,
        cross_fit: Callable[[Dataset], Any] | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.ocd = ocd
        self.args = args or OCDTrainingArguments()
        self.cross_fit = cross_fit
        self.accelerator = accelerator or Accelerator()
        self.loss = loss if loss is not None else (ocd.config.loss or ocd.adapter.default_loss)
        if self.loss is None:
            raise ValueError(
                "Pass loss='cross_entropy', loss='mse' or a callable(output, target) -> per-sample loss [B]."
            )
        self.loss_fn = resolve_loss(self.loss)
        self.history: list[dict[str, float]] = []

    # keyword names of OCDWrapper.fit / calibrate before OCDTrainingArguments existed
    ALIASES = {
        "batch_size": "collect_batch_size",
        "grid": "calibration_grid",
        "min_gain_se": "calibration_min_gain_se",
    }

    @classmethod
    def from_kwargs(
        cls,
        ocd: Any,
        *,
        loss: str | LossFn | None = None,
        cross_fit: Callable[[Dataset], Any] | None = None,
        accelerator: Accelerator | None = None,
        **kwargs: Any,
    ) -> OCDTrainer:
        """A trainer whose arguments are `ocd.training_defaults` overridden by `kwargs` (field names or `ALIASES`)."""
        given = {cls.ALIASES.get(k, k): v for k, v in kwargs.items()}
        args = OCDTrainingArguments(**{**getattr(ocd, "training_defaults", {}), **given})
        return cls(ocd, args, loss=loss, cross_fit=cross_fit, accelerator=accelerator)

    @property
    def progress(self) -> bool:
        return self.args.progress and self.accelerator.is_main_process

    # ------------------------------------------------------------------ the whole fit
    def train(self, train_dataset: Dataset, eval_dataset: Dataset | None = None) -> Any:
        """Collect deltas on `train_dataset`, train the head, then calibrate on `eval_dataset` if given.

        Without `args.collect_dir` the deltas go to a temporary folder that every process shares and
        that is removed once the head is trained. Returns the wrapper.
        """
        with self._collect_dir() as collect_dir:
            store = self.collect(train_dataset, collect_dir)
            self.train_head(store)
        if eval_dataset is not None:
            self.calibrate(eval_dataset)
        elif self.accelerator.is_main_process:
            warnings.warn(
                "fit() without eval_dataset leaves the head uncalibrated (delta_scale=1.0). In our benchmarks "
                "uncalibrated heads were often no better or worse than the base model (docs/findings.md); pass "
                "a held-out labelled split as eval_dataset to choose delta_scale on it.",
                UserWarning,
                stacklevel=3,
            )
        return self.ocd

    @contextlib.contextmanager
    def _collect_dir(self):
        if self.args.collect_dir is not None:
            yield self.args.collect_dir
            return
        acc = self.accelerator
        path = self._shared_tempdir()
        try:
            yield path
        finally:
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(path, ignore_errors=True)

    def _shared_tempdir(self) -> str:
        """A temporary folder made by the main process and broadcast, so every process writes into it."""
        return from_main(self.accelerator, lambda: tempfile.mkdtemp(prefix="ocd-collect-"))

    # ------------------------------------------------------------------ step 0: layer selection
    def select_layer(self, data: Any, **kwargs: Any) -> SelectionReport:
        """Pick the wrapper's target layer by Eq. 6 on `data` (a batch or a Dataset) and use it from now on.

        kwargs go to `ocd_hf.select_layer` (num_perturbations, sigma, max_samples, layer=[names], ...), over
        the wrapper's `selection_kwargs`. The report is kept in `ocd.selection_report`, its summary in `ocd.state`.
        """
        ocd = self.ocd
        kwargs = {"seed": self.args.seed, "progress": self.progress, **ocd.selection_kwargs, **kwargs}
        # the main process chooses (a time budget can make K differ between processes) and tells the others
        report = from_main(
            self.accelerator, lambda: select_layer(ocd.model, data, self.loss_fn, adapter=ocd.adapter, **kwargs)
        )
        ocd.config = ocd.config.replace(layer=report.winner)
        warn_if_large(report.winner, ocd.layer, ocd.config.target)
        ocd.state.selection = report.summary()
        ocd.selection_report = report
        return report

    # ------------------------------------------------------------------ step 1: collection
    def collect(self, dataset: Dataset, collect_dir: str | None = None) -> DeltaStore:
        """Per-sample overfitting of the target layer on `dataset`, streamed to `collect_dir`.

        With `cross_fit` the data is split into `args.num_folds` folds; fold k's deltas and I(x) come from
        a model trained on the other folds. Under accelerate the shards (or folds) are shared out between
        processes. layer="auto" is resolved first, on the first samples of `dataset`.
        """
        ocd, acc = self.ocd, self.accelerator
        collect_dir = collect_dir or self.args.collect_dir
        temporary = collect_dir is None
        if temporary:  # a shared temporary folder, removed when the returned store is garbage-collected
            collect_dir = self._shared_tempdir()
        if ocd.layer is None:
            self.select_layer(dataset)
        pi, np_ = acc.process_index, acc.num_processes
        if self.cross_fit is None:
            self._collect_into(dataset, collect_dir, pi, np_)
            paths: str | list[Path] = collect_dir
            mode: dict[str, Any] = {"mode": "given data"}
        else:
            paths = cross_fit_collect(
                ocd.module,
                dataset,
                Path(collect_dir),
                self.cross_fit,
                lambda part, out: self._collect_into(part, out, 0, 1),
                num_folds=self.args.num_folds,
                seed=self.args.seed,
                process_index=pi,
                num_processes=np_,
            )
            mode = {"mode": "cross_fit", "num_folds": self.args.num_folds}
        acc.wait_for_everyone()
        # the loss becomes part of the head's settings only once a collection succeeded with it
        ocd.loss_fn = self.loss_fn
        if isinstance(self.loss, str):
            task = ocd.config.task or ("classification" if self.loss == "cross_entropy" else "regression")
            ocd.config = ocd.config.replace(loss=self.loss, task=task)
        ocd.state.collection = mode
        store = DeltaStore(paths)
        if temporary and acc.is_main_process:
            weakref.finalize(store, shutil.rmtree, collect_dir, True)
        return store

    def _collect_into(self, dataset: Dataset, out: Any, pi: int, np_: int) -> None:
        ocd, c = self.ocd, self.ocd.config
        collect_deltas(
            ocd.module,
            c.layer,
            dataset,
            self.loss_fn,
            out,
            OverfitSettings.from_config(c),
            split_batch=ocd.adapter.split_batch,
            forward_fn=ocd.adapter.forward,
            collate_fn=ocd.adapter.collate_fn(),
            to_device=lambda b: ocd.adapter.to_device(b, ocd.device),
            batch_size=self.args.collect_batch_size,
            shard_size=self.args.shard_size,
            max_memory=self.args.max_memory,
            progress=self.progress,
            process_index=pi,
            num_processes=np_,
            conditioner=ocd.conditioner,
        )

    # ------------------------------------------------------------------ step 2: the head
    def train_head(self, store: DeltaStore) -> list[dict[str, float]]:
        """Build a head for the collection's shapes and train it; the wrapper then holds it."""
        ocd = self.ocd
        if ocd.layer is None:
            raise RuntimeError("layer='auto' is not resolved yet: call select_layer(data) or collect(dataset) first.")
        if store.target != ocd.config.target:
            raise ValueError(
                f"The collection holds target={store.target!r} deltas but the config asks for target={ocd.config.target!r}."
            )
        check_collection(store.manifest.get("conditioner"), ocd.conditioner)
        weight_shape = tuple(ocd.layer.weight.shape)
        if tuple(store.weight_shape) != weight_shape:
            raise ValueError(
                f"Collection targets a {store.weight_shape} weight but layer {ocd.config.layer!r} is {weight_shape}."
            )
        sample = store[0]
        shapes = HeadShapes(
            weight_shape=weight_shape,
            target_shape=tuple(store.target_shape),
            input_dim=sample["layer_input"].numel(),
            activation_dim=sample["layer_output"].numel(),
            output_dim=sample["model_output"].numel(),
        )
        info = ocd.adapter.describe()
        # "auto" network sizes become explicit, so the saved config rebuilds this exact head
        ocd.config = resolve_sizes(ocd.config, shapes.target_shape)
        torch.manual_seed(self.args.seed)
        head = OCDHead(ocd.config, shapes)
        self.history = train_head(head, store, ocd.config, self.args, accelerator=self.accelerator)
        omega = store.get_batch(range(min(len(store), 2048)))
        target_std = float((omega["delta"].flatten(1) / omega["scale"][:, None].clamp_min(1e-12)).std())
        provenance = Provenance(
            base_model=ocd.provenance.base_model or info["base_model"],
            base_model_revision=ocd.provenance.base_model_revision,
            base_model_library=info["base_model_library"],
            layer_fingerprint=layer_fingerprint(ocd.layer.weight),
            library_version=__version__,
            conditioner=ocd.conditioner.name,
        )
        ocd.attach_head(head.to(ocd.device), shapes, provenance, target_std=target_std)
        return self.history

    # ------------------------------------------------------------------ step 3: calibration
    def calibrate(self, dataset: Dataset) -> dict[str, Any]:
        """Choose `delta_scale` on held-out labelled data (see `ocd_hf.calibration.calibrate`)."""
        ocd, a = self.ocd, self.args
        ocd.require_head()
        result = calibrate(
            ocd,
            dataset,
            self.loss_fn,
            grid=a.calibration_grid,
            min_gain_se=a.calibration_min_gain_se,
            rule=a.calibration_rule,
            batch_size=a.calibration_batch_size,
            seed=a.seed,
            progress=self.progress,
        )
        ocd.state.delta_scale = result["delta_scale"]
        ocd.state.calibration = result
        return result


def from_main(accelerator: Accelerator, make: Callable[[], Any]) -> Any:
    """`make()` run on the main process only, its result broadcast to the others."""
    box = [make() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    return box[0]
