"""Evaluation on a labelled dataset: base, oracle (overfit on the test label: the paper's upper bound),
OCD with one draw, OCD ensembles, and how close generated deltas are to the oracle's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .losses import cross_entropy
from .overfit import overfit_batch
from .wrapper import combine_draws


@dataclass
class EvaluationReport:
    task: str
    num_samples: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    cosine_to_oracle: dict[str, float] = field(default_factory=dict)

    def to_markdown(self) -> str:
        metrics = list(next(iter(self.rows.values())))
        lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for name, vals in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{vals[m]:.4f}" for m in metrics) + " |")
        if self.cosine_to_oracle:
            lines.append("")
            lines.append("Mean cosine to the oracle delta (held-out samples):")
            for name, v in self.cosine_to_oracle.items():
                lines.append(f"- {name}: {v:.3f}")
        return "\n".join(lines)


class _Meter:
    def __init__(self, task: str):
        self.task, self.n, self.loss, self.correct = task, 0, 0.0, 0

    def add(self, out: torch.Tensor, target: torch.Tensor) -> None:
        if self.task == "classification":
            self.loss += cross_entropy(out, target).sum().item()
            self.correct += (out.argmax(-1) == target).sum().item()
        else:
            t = target.to(out.dtype).reshape(out.shape)
            self.loss += (out - t).pow(2).flatten(1).mean(1).sum().item()
        self.n += target.shape[0]

    def result(self) -> dict[str, float]:
        if self.task == "classification":
            return {"cross_entropy": self.loss / self.n, "accuracy": self.correct / self.n}
        return {"mse": self.loss / self.n, "rmse": math.sqrt(self.loss / self.n)}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def evaluate(
    ocd: Any,
    dataset: Dataset,
    *,
    num_samples: int = 5,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> EvaluationReport:
    """Compare base, oracle, OCD (1 draw), OCD ×num_samples (probability average) and mean-weights ×num_samples."""
    c = ocd.config
    task = c.task or "classification"
    adapter = ocd.adapter
    gen = torch.Generator(device=ocd.device).manual_seed(seed)
    names = ["base", "oracle (overfit on test label)", "OCD", f"OCD x{num_samples}", f"OCD mean-weights x{num_samples}"]
    meters = {n: _Meter(task) for n in names}
    cos = {"OCD (1 draw)": [], "mean training delta": []}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=adapter.collate_fn())
    for batch in tqdm(loader, desc="evaluating", disable=not progress):
        inputs, targets = adapter.split_batch(adapter.to_device(batch, ocd.device))
        cond, base_out = ocd.conditioning(inputs)
        oracle = overfit_batch(
            ocd.module, ocd.layer, inputs, targets, ocd._loss_fn, adapter.forward,
            c.overfit_steps, c.overfit_lr, c.overfit_optimizer, False, c.target,
        ).delta
        deltas = ocd.generate_deltas(cond, num_samples, gen)
        outs = torch.stack([ocd.forward_with_deltas(inputs, d) for d in deltas])
        meters["base"].add(base_out, targets)
        meters[names[1]].add(ocd.forward_with_deltas(inputs, oracle), targets)
        meters["OCD"].add(outs[0], targets)
        meters[names[3]].add(combine_draws(outs, task), targets)
        meters[names[4]].add(ocd.forward_with_deltas(inputs, deltas.mean(0)), targets)
        cos["OCD (1 draw)"].append(_cosine(deltas[0], oracle))
        cos["mean training delta"].append(_cosine(ocd.head.mean_delta.reshape(oracle.shape[1:]).expand_as(oracle), oracle))
    return EvaluationReport(
        task=task,
        num_samples=num_samples,
        rows={n: m.result() for n, m in meters.items()},
        cosine_to_oracle={k: torch.cat(v).mean().item() for k, v in cos.items()},
    )
