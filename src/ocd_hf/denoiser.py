"""The weight denoiser ε(Ω_t, e, t): a diffusers `UNet1DModel` conditioned on I(x).

e = PE(t) + E_i(i_L) + E_a(a_L) + E_o(f(x)). The U-Net has no conditioning input, so the encoders'
sum is added to the output of its timestep MLP (`unet.time_mlp`) by a forward hook; every residual
block of the U-Net then sees it, exactly like the timestep embedding.

Classifier-free guidance: the null condition is the all-zeros *normalised* I(x) (the training mean);
`drop_condition` swaps it in for chosen samples while training (`OCDConfig.cond_dropout`), and
`sampling.sample_omega` mixes conditional and null predictions (`guidance_scale`).

Layout: the weight is viewed as a matrix [rows, cols] (conv kernels flattened per output channel).
"rows": the rows are the sequence and the columns the channels; "cols": the transpose. The sequence is
zero-padded to a multiple of 2^(n_blocks-1) and the padding is cropped from the prediction.

Mish: the U-Net's residual blocks hard-code `nn.Mish`, whose CPU kernel is several times slower than the
same function written with `exp` (docs/concepts.md, "Where the latency goes"). Outside autograd every Mish
of the denoiser runs that formula (`FastMish`); training, which needs Mish's gradient, runs torch's own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from .capture import Conditioning
from .config import OCDConfig, resolve_sizes
from .state import HeadShapes


class FastMish(nn.Mish):
    """`nn.Mish` (same module, same state) that runs x·n/(n+2), n = eˣ(eˣ+2), when no gradient is recorded.

    tanh(softplus(x)) = ((1+eˣ)² − 1) / ((1+eˣ)² + 1) = n/(n+2); x is clamped at 20 inside the exp, above
    which n/(n+2) is 1 in float32 anyway. The result agrees with torch's Mish to float rounding. Small
    tensors (under `MIN_NUMEL` numbers) keep torch's kernel: there one call beats the formula's five.
    """

    MIN_NUMEL = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or x.numel() < self.MIN_NUMEL:
            return super().forward(x)
        n = torch.exp(x.clamp(max=20.0))
        n = n.mul_(n + 2.0)
        return n.div_(n + 2.0).mul_(x)


def use_fast_mish(module: nn.Module) -> None:
    """Swap every `nn.Mish` inside `module` for a `FastMish` (no parameters: nothing else changes)."""
    for child in list(module.modules()):
        for key, sub in list(child.named_children()):
            if type(sub) is nn.Mish:
                setattr(child, key, FastMish())


class ConditionEncoder(nn.Module):
    """A two-layer MLP from one conditioning vector to the U-Net's embedding width."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Mish(), nn.Linear(hidden, out_dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.net(v)


def null_condition(cond: Conditioning) -> Conditioning:
    """The null ("unconditional") condition for normalised I(x): all zeros, i.e. the training mean."""
    return Conditioning(*(torch.zeros_like(c) for c in cond))


def drop_condition(cond: Conditioning, drop: torch.Tensor | None) -> Conditioning:
    """Normalised `cond` with the samples where `drop` [B] (bool) is True replaced by the null condition.

    `drop=None` returns `cond` itself (no op at all).
    """
    if drop is None:
        return cond
    return Conditioning(*(torch.where(drop.view(-1, *([1] * (c.dim() - 1))), torch.zeros_like(c), c) for c in cond))


def matrix_shape(weight_shape: tuple[int, ...]) -> tuple[int, int]:
    return weight_shape[0], int(math.prod(weight_shape[1:]))


class ConditionalUNet1D(nn.Module):
    """Predicts (per `prediction_type`) noise, clean sample or velocity for normalised deltas Ω."""

    def __init__(self, config: OCDConfig, shapes: HeadShapes):
        super().__init__()
        config = resolve_sizes(config, tuple(shapes.target_shape))
        # the generated tensor: the weight's shape, or (out, 1) for target="factored"
        self.weight_shape = tuple(shapes.target_shape)
        rows, cols = matrix_shape(self.weight_shape)
        self.transpose = config.layout == "cols"
        channels, length = (rows, cols) if self.transpose else (cols, rows)
        n = len(config.block_out_channels)
        mult = 2 ** (n - 1)
        self.length = length
        self.padded_length = int(math.ceil(length / mult) * mult)
        from diffusers import UNet1DModel  # lazily: importing diffusers pulls in torch._dynamo

        self.unet = UNet1DModel(
            sample_size=self.padded_length,
            in_channels=channels,
            out_channels=channels,
            use_timestep_embedding=True,
            time_embedding_type="positional",
            flip_sin_to_cos=False,
            freq_shift=1.0,
            down_block_types=("DownResnetBlock1D",) * n,
            up_block_types=("UpResnetBlock1D",) * (n - 1),
            mid_block_type="MidResTemporalBlock1D",
            out_block_type="OutConv1DBlock",
            block_out_channels=tuple(config.block_out_channels),
            act_fn="mish",
            norm_num_groups=config.norm_num_groups,
            layers_per_block=config.layers_per_block,
        )
        emb = config.block_out_channels[0]
        h = config.cond_hidden_dim
        self.enc_input = ConditionEncoder(shapes.input_dim, h, emb)
        self.enc_activation = ConditionEncoder(shapes.activation_dim, h, emb)
        self.enc_output = ConditionEncoder(shapes.output_dim, h, emb)
        # the condition dropout this denoiser was built (and trained) with: guidance warns when it is 0
        self.cond_dropout = float(config.cond_dropout)
        self._cond: torch.Tensor | None = None
        self._cache: tuple[Conditioning, torch.Tensor] | None = None
        self._caching = False
        self.unet.time_mlp.register_forward_hook(self._add_condition)
        use_fast_mish(self)

    def _add_condition(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._cond is None:
            raise RuntimeError("ConditionalUNet1D must be called through its own forward (conditioning missing).")
        return output + self._cond

    def to_sequence(self, omega: torch.Tensor) -> torch.Tensor:
        """[B, *weight_shape] -> [B, channels, padded_length]."""
        m = omega.reshape(omega.shape[0], *matrix_shape(self.weight_shape))
        seq = m if self.transpose else m.transpose(1, 2)
        return nn.functional.pad(seq, (0, self.padded_length - self.length))

    def from_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        seq = seq[..., : self.length]
        m = seq if self.transpose else seq.transpose(1, 2)
        return m.reshape(seq.shape[0], *self.weight_shape)

    def encode_condition(self, cond: Conditioning) -> torch.Tensor:
        """E_i(i_L) + E_a(a_L) + E_o(f(x)) for normalised I(x): [B, embedding width]."""
        return (
            self.enc_input(cond.layer_input)
            + self.enc_activation(cond.layer_output)
            + self.enc_output(cond.model_output)
        )

    @contextlib.contextmanager
    def condition_cache(self) -> Iterator[None]:
        """Within this block the embedding of a condition is computed once and reused while the same
        `Conditioning` object is passed again (a sampling loop calls the denoiser once per step with it)."""
        self._caching, self._cache = True, None
        try:
            yield
        finally:
            self._caching, self._cache = False, None

    def _embedding(self, cond: Conditioning) -> torch.Tensor:
        if not self._caching:
            return self.encode_condition(cond)
        # keyed on identity: the same object holds the same tensors, so the embedding cannot be stale
        if self._cache is None or self._cache[0] is not cond:
            self._cache = (cond, self.encode_condition(cond))
        return self._cache[1]

    def forward(self, omega_t: torch.Tensor, timesteps: torch.Tensor | int, cond: Conditioning) -> torch.Tensor:
        """omega_t [B, *weight_shape], timesteps [B] or scalar, cond normalised I(x) -> prediction [B, *weight_shape]."""
        self._cond = self._embedding(cond)
        try:
            out = self.unet(self.to_sequence(omega_t), timesteps).sample
        finally:
            self._cond = None
        return self.from_sequence(out)
