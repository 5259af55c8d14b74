"""`OCDHead`: everything a trained OCD head stores — denoiser, scale net and normalisation statistics,
and the distilled one-pass student once `OCDWrapper.distill` made one.

Its state dict is exactly what `ocd_head.safetensors` holds (the student's tensors under `student.`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .capture import Conditioning
from .config import OCDConfig, resolve_sizes
from .denoiser import ConditionalUNet1D, drop_condition
from .health import SampleHealth, all_finite, check_samples
from .modes import eval_mode
from .sampling import make_sampling_scheduler, sample_omega
from .scale import ScaleNet
from .state import HeadShapes

_COND_KEYS = ("layer_input", "layer_output", "model_output")
NORM_CLIP = 10.0


class OCDHead(nn.Module):
    """Denoiser, scale net and the conditioning's normalisation statistics of one head.

    Args:
        config: The head's settings (network sizes, layout); "auto" sizes are resolved from `shapes`.
        shapes: The target layer's and the conditioning's shapes.
    """

    def __init__(self, config: OCDConfig, shapes: HeadShapes):
        super().__init__()
        config = resolve_sizes(config, tuple(shapes.target_shape))
        self.config, self.shapes = config, shapes  # what a student of another size is built from
        self.denoiser = ConditionalUNet1D(config, shapes)
        self.scale_net = ScaleNet(config, shapes)
        dims = {
            "layer_input": shapes.input_dim,
            "layer_output": shapes.activation_dim,
            "model_output": shapes.output_dim,
        }
        for key, d in dims.items():
            self.register_buffer(f"{key}_mean", torch.zeros(d))
            self.register_buffer(f"{key}_std", torch.ones(d))
        # The mean training delta: the "same delta for every sample" control and a sanity baseline.
        self.register_buffer("mean_delta", torch.zeros(*shapes.target_shape))
        # the one-pass student (ocd_hf.distillation) and the guidance_scale of the sampling it imitates
        self.student: ConditionalUNet1D | None = None
        self.student_guidance: float | None = None
        # torch.compile options (`compile`) and the compiled samplers, built on first use; never saved
        self.compile_options: dict | None = None
        self._compiled: dict[int, nn.Module] = {}

    def compile(self, **options) -> None:
        """Sample through `torch.compile`d copies of the denoiser and the student (faster batched sampling).

        The compiled networks share the originals' weights, so training, distillation and saving are
        unaffected; each sampler compiles on its first call (tens of seconds on a CPU, and again for a new
        batch size unless `dynamic=True`), so compile for serving, not for one-off calls. A student made
        later (`distill`) is compiled too.

        Args:
            **options: passed to `torch.compile` (e.g. `mode="max-autotune"`, `dynamic=True`).
        """
        self.compile_options = dict(options)
        self._compiled = {}

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_compiled"] = {}  # compiled graphs are tied to one process and are rebuilt on demand
        return state

    def _maybe_compiled(self, net: ConditionalUNet1D) -> nn.Module:
        if self.compile_options is None:
            return net
        if id(net) not in self._compiled:
            # keyed by identity: a new student gets its own compiled copy; at most the denoiser and one student
            self._compiled = {k: v for k, v in self._compiled.items() if k in (id(self.denoiser), id(self.student))}
            self._compiled[id(net)] = torch.compile(net, **self.compile_options)
        return self._compiled[id(net)]

    def add_student(self, guidance_scale: float, channels: tuple[int, ...] | None = None) -> ConditionalUNet1D:
        """A one-pass student imitating sampling at `guidance_scale`.

        Args:
            guidance_scale: The guidance of the sampling it imitates.
            channels: None: a copy of the denoiser, weights included. Else the U-Net's `block_out_channels`:
                a new, randomly initialised denoiser of that width for the same shapes (its encoders
                output that width; every other setting is the denoiser's).
        """
        if channels is None:
            self.student = copy.deepcopy(self.denoiser)
        else:
            self.student = ConditionalUNet1D(self.config.replace(block_out_channels=tuple(channels)), self.shapes)
        self.student_guidance = float(guidance_scale)
        return self.student

    def sampler_for(self, config: OCDConfig) -> tuple[ConditionalUNet1D, int, float]:
        """(denoiser, passes, guidance_scale) that `config.sampler` asks for; raises if the head cannot do it."""
        if config.sampler == "ddim":
            return self._maybe_compiled(self.denoiser), config.num_inference_steps, config.guidance_scale
        if self.student is None:
            raise RuntimeError(
                "sampler='distilled' but this head has no distilled student: call ocd.distill(dataset) first, or "
                "sample with the diffusion model: ocd.config = ocd.config.replace(sampler='ddim')."
            )
        if config.guidance_scale != self.student_guidance:
            raise ValueError(
                f"The distilled student imitates sampling at guidance_scale={self.student_guidance:g}, but the config "
                f"asks for guidance_scale={config.guidance_scale:g}. Distill again at the new scale "
                "(ocd.distill(dataset)), or sample with the diffusion model: "
                "ocd.config = ocd.config.replace(sampler='ddim')."
            )
        # the student's guidance is baked in: one unguided pass from t = T-1 (a 1-step DDIM)
        return self._maybe_compiled(self.student), 1, 1.0

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

    @torch.no_grad()
    def generate(
        self,
        cond: Conditioning,
        config: OCDConfig,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        *,
        delta_scale: float = 1.0,
        target_std: float | None = None,
    ) -> tuple[torch.Tensor, SampleHealth]:
        """delta_scale · ρ̂(I(x)) · Ω_0 with Ω_0 drawn by DDIM or the distilled student (`config.sampler`),
        and the draws' health.

        Returns [num_samples, B, *target_shape] deltas ([.., B, out] for a factored target). Raises on
        non-finite deltas; warns when the draws' spread leaves `target_std`'s range.
        """
        denoiser, steps, guidance = self.sampler_for(config)
        normed = self.normalize(cond)
        omega = sample_omega(
            denoiser, normed, make_sampling_scheduler(config), steps, num_samples, generator, guidance_scale=guidance
        )
        health = check_samples(omega, target_std)
        with eval_mode(self.scale_net):  # sample_omega puts the denoiser in eval mode itself
            scale = self.scale_net(normed) * delta_scale
        delta = omega * scale.view(1, -1, *([1] * (omega.dim() - 2)))
        if config.target == "factored":
            delta = delta.squeeze(-1)
        if not all_finite(delta):
            raise FloatingPointError(
                "The head's scale net gave non-finite deltas; it has likely diverged (retrain it with a lower "
                "learning_rate)."
            )
        return delta, health
