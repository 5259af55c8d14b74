"""`OCDHead`: everything a trained OCD head stores — denoiser, scale net and normalisation statistics.

Its state dict is exactly what `ocd_head.safetensors` holds.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import Conditioning
from .config import OCDConfig
from .denoiser import ConditionalUNet1D, drop_condition
from .scale import ScaleNet

_COND_KEYS = ("layer_input", "layer_output", "model_output")
NORM_CLIP = 10.0


class OCDHead(nn.Module):
    def __init__(self, config: OCDConfig):
        super().__init__()
        self.config = config
        self.denoiser = ConditionalUNet1D(config)
        self.scale_net = ScaleNet(config)
        dims = {
            "layer_input": config.input_dim,
            "layer_output": config.activation_dim,
            "model_output": config.output_dim,
        }
        for key, d in dims.items():
            self.register_buffer(f"{key}_mean", torch.zeros(d))
            self.register_buffer(f"{key}_std", torch.ones(d))
        # The mean training delta: the "same delta for every sample" control and a sanity baseline.
        self.register_buffer("mean_delta", torch.zeros(*config.target_shape))

    def normalize(self, cond: Conditioning) -> Conditioning:
        """Standardise each conditioning vector with the training set's statistics.

        Values are clipped to ±NORM_CLIP standard deviations: a unit that never fired in the collection
        (std ≈ 0) but fires at inference would otherwise reach 1e5 and blow up the scale net's exp.
        """
        return Conditioning(
            *(
                ((getattr(cond, k).float() - getattr(self, f"{k}_mean")) / getattr(self, f"{k}_std")).clamp(
                    -NORM_CLIP, NORM_CLIP
                )
                for k in _COND_KEYS
            )
        )

    def forward(
        self,
        omega_t: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass on raw I(x): (denoiser prediction, predicted scale ρ̂).

        `drop` [B] (bool): samples whose denoiser sees the null condition (zeros after normalisation)
        instead of I(x), for classifier-free guidance; the scale net always sees the real I(x).
        Both nets run through this one forward so that a DistributedDataParallel wrapper sees them.
        """
        normed = self.normalize(cond)
        return self.denoiser(omega_t, timesteps, drop_condition(normed, drop)), self.scale_net(normed)

    @torch.no_grad()
    def set_statistics(self, store) -> None:
        """Fill normalisation buffers, the mean delta and the scale net's starting point from a DeltaStore."""
        for k in _COND_KEYS:
            getattr(self, f"{k}_mean").copy_(store.mean(k))
            std = store.std(k)
            # dead units get a floor relative to the vector's typical spread, not an absolute 1e-6
            getattr(self, f"{k}_std").copy_(std.clamp_min(max(1e-6, 1e-2 * float(std.mean()))))
        self.mean_delta.copy_(store.mean("delta").reshape(self.mean_delta.shape))
        self.scale_net.init_log_scale(float(store.column("scale").clamp_min(1e-30).log().mean()))
