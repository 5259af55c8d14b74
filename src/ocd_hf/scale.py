"""The scale net ρ(I(x)) and its loss 10·log10(|ρ̂−ρ|²/ρ² + ε) from the paper."""

from __future__ import annotations

import torch
from torch import nn

from .capture import Conditioning
from .config import OCDConfig
from .state import HeadShapes


class ScaleNet(nn.Module):
    """Predicts the delta's scale ρ (its std) from the normalised conditioning; positive by construction."""

    def __init__(self, config: OCDConfig, shapes: HeadShapes):
        super().__init__()
        d = shapes.input_dim + shapes.activation_dim + shapes.output_dim
        h = config.scale_hidden_dim
        self.net = nn.Sequential(nn.Linear(d, h), nn.Mish(), nn.Linear(h, h), nn.Mish(), nn.Linear(h, 1))

    def init_log_scale(self, mean_log_scale: float) -> None:
        """Start at the training set's typical scale so early samples are not off by orders of magnitude."""
        with torch.no_grad():
            self.net[-1].bias.fill_(mean_log_scale)

    def forward(self, cond: Conditioning) -> torch.Tensor:
        v = torch.cat([cond.layer_input, cond.layer_output, cond.model_output], dim=1)
        return self.net(v).squeeze(1).exp()


def scale_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean over the batch of 10·log10((ρ̂−ρ)²/ρ² + eps): a relative error in decibels."""
    rel = (pred - target).pow(2) / target.pow(2).clamp_min(1e-30)
    return (10.0 * torch.log10(rel + eps)).mean()
