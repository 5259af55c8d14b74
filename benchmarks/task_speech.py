"""Speech separation with OCD on synthetic mixtures: a stand-in for the paper's Libri5Mix table (Tab. 5).

    python -m benchmarks.task_speech --seeds 0 1 2                          # 5 sources, minutes per seed
    python -m benchmarks.task_speech --num-sources 2 3 4 5 --seeds 0 1 2    # one table per source count
    python -m benchmarks.task_speech --seeds 0 --quick --out-dir /tmp/sp    # seconds (toy sizes, 3 sources)

Each (source count, seed) run is saved as build/bench-runs/speech-{S}src-seed{N}.json when it finishes and
reused by a rerun (--force reruns it), so counts and seeds can run in separate processes and a last call
with all of them writes the tables.

No speech corpus is reachable offline, so every mixture is built here from synthetic "voices"
(`synth_source`): a harmonic tone whose pitch glides and wobbles (vibrato), shaped by three drifting
formant-like resonances, switched on and off in syllable-like bursts, with a few band-passed noise
bursts (consonant-like). This is NOT speech: the numbers say how OCD behaves on a separation network
and a permutation-invariant loss, not what it does on LibriMix.

The base model (`TasNet`) is a small Conv-TasNet-style network for a FIXED number of sources: a learned
encoder convolution, residual blocks of 1x1 conv → depthwise dilated conv → 1x1 projection, one sigmoid
mask per source, and a transposed-convolution decoder. One model per number of sources keeps the loss
plain PIT SI-SDR (a model with padded silent targets would need a second loss for the silent outputs,
where SI-SDR is undefined). OCD generates the weight of the last block's 1x1 output projection
(`blocks.<last>.proj`, a Conv1d with kernel 1), as the paper targets the last block's projection.

One OCD sample is one whole mixture; its loss is the negative PIT SI-SDR (`pit_loss`). The model returns
its estimates as [B, time, sources]: the core pools a model output over every dimension between the
batch and the last one, so this layout makes f(x) one number per source (the mean of its waveform)
rather than a whole waveform; the layer's own input and output are pooled over time per channel.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

SAMPLE_RATE = 8000
CONTROL = 40  # samples between updates of the formant gains (5 ms at 8 kHz)
EPS = 1e-8

# ---------------------------------------------------------------------------------------------- SI-SDR, PIT


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Scale-invariant SDR in dB over the last dimension (Le Roux et al. 2019); both are made zero-mean.

    Args:
        estimate: [..., T].
        reference: [..., T], broadcastable against `estimate`.
        eps: Keeps silent references and perfect estimates finite.
    """
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    alpha = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * reference
    noise = estimate - target
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))


def _perms(n: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(permutations(range(n))), device=device)


def pit_si_sdr(estimates: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The best assignment of estimates to references by mean SI-SDR, over every permutation.

    Args:
        estimates: [B, S, T].
        references: [B, S, T].

    Returns:
        (mean SI-SDR of the best assignment [B], that assignment [B, S]: estimate index for reference j).
    """
    if estimates.shape != references.shape:
        raise ValueError(f"estimates {tuple(estimates.shape)} and references {tuple(references.shape)} differ.")
    s = estimates.shape[1]
    pair = si_sdr(estimates[:, :, None], references[:, None, :])  # [B, S_est, S_ref]
    perms = _perms(s, estimates.device)  # [P, S]
    scores = pair[:, perms, torch.arange(s, device=estimates.device)].mean(-1)  # [B, P]
    best, idx = scores.max(1)
    return best, perms[idx]


def pit_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OCD's per-sample loss: minus the PIT SI-SDR of one mixture's estimates, [B].

    Args:
        output: The model's estimates, [B, T, S].
        target: The true sources, [B, T, S].
    """
    return -pit_si_sdr(output.transpose(1, 2), target.to(output.dtype).transpose(1, 2))[0]


def align(estimates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """`estimates` [B, S, T] reordered so that estimate j is the one PIT assigns to reference j."""
    _, perm = pit_si_sdr(estimates, references)
    return estimates.gather(1, perm[:, :, None].expand_as(estimates))


# ---------------------------------------------------------------------------------------------- the data


def synth_source(rng: np.random.Generator, n: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One synthetic "voice" of `n` samples, unit RMS (see the module docstring).

    The formant filter is applied in the source-filter way: each harmonic's amplitude is the gain of three
    Lorentzian resonances (whose centres drift linearly over the clip) at that harmonic's frequency. For
    slowly changing pitch and resonances that is what running the time-varying filters would give, at a
    fraction of the cost.
    """
    t = np.arange(n) / sr
    # pitch: a glide of up to half an octave either way, plus vibrato
    f_start = rng.uniform(90.0, 280.0)
    f_end = f_start * 2.0 ** rng.uniform(-0.5, 0.5)
    glide = np.exp(np.linspace(np.log(f_start), np.log(f_end), n))
    vib_rate, vib_depth = rng.uniform(4.0, 7.0), rng.uniform(0.005, 0.03)
    f0 = glide * (1 + vib_depth * np.sin(2 * np.pi * vib_rate * t + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    k = np.arange(1, int(0.95 * (sr / 2) / f0.min()) + 1, dtype=np.float64)[:, None]  # [K, 1]
    # the resonances move slowly: their gains are computed every CONTROL samples and held in between
    f0_ctl = f0[::CONTROL]
    freqs = k * f0_ctl[None, :]  # [K, n / CONTROL]
    gain = np.full_like(freqs, 0.02)
    for lo, hi in ((300.0, 900.0), (900.0, 2300.0), (2300.0, 3400.0)):
        c0 = rng.uniform(lo, hi)
        centre = np.linspace(c0, c0 * rng.uniform(0.8, 1.2), len(f0_ctl))
        half_bw = rng.uniform(40.0, 100.0)
        gain += 1.0 / (1.0 + ((freqs - centre) / half_bw) ** 2)
    amp = np.repeat(gain / k * (freqs < 0.95 * sr / 2), CONTROL, axis=1)[:, :n].astype(np.float32)
    offsets = rng.uniform(0, 2 * np.pi, size=(len(k), 1))
    voiced = (amp * np.sin((k * phase[None, :] + offsets).astype(np.float32))).sum(0, dtype=np.float64)
    # syllables: raised-cosine bursts with gaps; some become band-passed noise bursts instead
    env_v, env_n = np.zeros(n), np.zeros(n)
    pos = int(rng.uniform(0.0, 0.05) * sr)
    while pos < n:
        noisy = rng.uniform() < 0.2
        length = int(rng.uniform(0.03, 0.08) * sr) if noisy else int(rng.uniform(0.08, 0.2) * sr)
        seg = np.hanning(max(length, 2))[: n - pos]
        (env_n if noisy else env_v)[pos : pos + len(seg)] += seg
        pos += length + int(rng.uniform(0.02, 0.1) * sr)
    spec = np.fft.rfft(rng.standard_normal(n))
    band_lo = rng.uniform(1500.0, 3000.0)
    f_bins = np.fft.rfftfreq(n, 1 / sr)
    spec[(f_bins < band_lo) | (f_bins > band_lo + rng.uniform(500.0, 1500.0))] = 0
    noise = np.fft.irfft(spec, n)
    voiced_part = voiced * env_v / (np.sqrt(np.mean(voiced**2)) + EPS)
    noise_part = noise * env_n / (np.sqrt(np.mean(noise**2)) + EPS) * 0.5
    src = voiced_part + noise_part
    return src / (np.sqrt(np.mean(src**2)) + EPS)


def make_mixtures(num: int, num_sources: int, n: int, seed: int) -> TensorDataset:
    """`num` mixtures of `num_sources` synthetic voices at random levels (±2.5 dB), deterministic in `seed`.

    Returns:
        TensorDataset(mixture [num, n], sources [num, n, num_sources]); each mixture has unit RMS and its
        sources sum to it (up to float32 rounding).
    """
    rng = np.random.default_rng(seed)
    srcs = np.empty((num, num_sources, n), dtype=np.float64)
    for i in range(num):
        for j in range(num_sources):
            srcs[i, j] = synth_source(rng, n) * 10 ** (rng.uniform(-2.5, 2.5) / 20)
    mix = srcs.sum(1)
    norm = np.sqrt(np.mean(mix**2, axis=1, keepdims=True)) + EPS
    mix, srcs = mix / norm, srcs / norm[:, :, None]
    return TensorDataset(
        torch.from_numpy(mix.astype(np.float32)), torch.from_numpy(srcs.transpose(0, 2, 1).astype(np.float32))
    )


# ---------------------------------------------------------------------------------------------- the model


class TCNBlock(nn.Module):
    """Conv-TasNet's residual block: 1x1 conv up, depthwise dilated conv, 1x1 projection back (`proj`)."""

    def __init__(self, channels: int, hidden: int, dilation: int):
        super().__init__()
        self.conv_in = nn.Conv1d(channels, hidden, 1)
        self.act1, self.norm1 = nn.PReLU(), nn.GroupNorm(1, hidden)
        self.dconv = nn.Conv1d(hidden, hidden, 3, dilation=dilation, padding=dilation, groups=hidden)
        self.act2, self.norm2 = nn.PReLU(), nn.GroupNorm(1, hidden)
        self.proj = nn.Conv1d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.act1(self.conv_in(x)))
        return x + self.proj(self.norm2(self.act2(self.dconv(h))))


class TasNet(nn.Module):
    """A small Conv-TasNet-style separator for a fixed number of sources: mixture [B, T] -> [B, T, S].

    Args:
        num_sources: S, the number of estimates.
        enc_channels: Filters of the learned encoder.
        channels: Bottleneck width of the residual blocks.
        hidden: Width inside each block.
        num_blocks: Residual blocks; dilations cycle 1, 2, 4, 8.
        kernel: Encoder/decoder filter length (stride kernel // 2).
    """

    def __init__(
        self,
        num_sources: int,
        enc_channels: int = 64,
        channels: int = 32,
        hidden: int = 64,
        num_blocks: int = 6,
        kernel: int = 16,
    ):
        super().__init__()
        self.num_sources, self.kernel = num_sources, kernel
        self.encoder = nn.Conv1d(1, enc_channels, kernel, stride=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(1, enc_channels)
        self.bottleneck = nn.Conv1d(enc_channels, channels, 1)
        self.blocks = nn.ModuleList(TCNBlock(channels, hidden, 2 ** (i % 4)) for i in range(num_blocks))
        self.mask_act = nn.PReLU()
        self.mask = nn.Conv1d(channels, num_sources * enc_channels, 1)
        self.decoder = nn.ConvTranspose1d(enc_channels, 1, kernel, stride=kernel // 2, bias=False)

    @property
    def target_layer(self) -> str:
        """The layer OCD generates: the last block's output projection."""
        return f"blocks.{len(self.blocks) - 1}.proj"

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        b, n = mixture.shape
        # padding by one filter length makes the decoder's output at least n long
        w = torch.relu(self.encoder(F.pad(mixture[:, None], (0, self.kernel))))  # [B, N, frames]
        y = self.bottleneck(self.norm(w))
        for block in self.blocks:
            y = block(y)
        masks = torch.sigmoid(self.mask(self.mask_act(y))).view(b, self.num_sources, *w.shape[1:])
        est = self.decoder((w[:, None] * masks).flatten(0, 1)).view(b, self.num_sources, -1)[..., :n]
        return est.transpose(1, 2)


def train_base(model: TasNet, train: TensorDataset, steps: int, batch_size: int, seed: int, lr: float = 1e-3) -> None:
    """Adam on the mean PIT loss, with gradient clipping and a cosine decay of the learning rate."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mix, src = train.tensors
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(mix), (batch_size,), generator=gen)
        opt.zero_grad()
        pit_loss(model(mix[idx]), src[idx]).mean().backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
    model.eval()


# ---------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class SpeechSizes:
    """Everything that differs between the quick and the full run.

    Args:
        num_sources: Sources per mixture (5 stands in for Libri5Mix).
        seconds: Clip length at 8 kHz.
        n_train: Mixtures the base model trains on; OCD collects its deltas on the same ones.
        n_val: Held-out mixtures that choose delta_scale.
        n_test: Held-out mixtures scored.
        base_steps: Optimizer steps of the base model (batch `base_batch`).
        base_batch: Its batch size.
        ocd_steps: Head training steps.
        channels: (encoder filters, bottleneck, hidden, blocks) of `TasNet`.
        eval_batch: Mixtures per evaluation batch.
        overfit_lr: OCD's per-sample Adam learning rate (3 steps). Ten times the paper's 5e-4: at 5e-4 the
            oracle itself gains almost nothing on this layer (docs/examples/speech.md).
    """

    num_sources: int = 5
    seconds: float = 0.5
    n_train: int = 1000
    n_val: int = 150
    n_test: int = 200
    base_steps: int = 800
    base_batch: int = 16
    ocd_steps: int = 1000
    channels: tuple[int, int, int, int] = (64, 32, 64, 6)
    eval_batch: int = 50
    overfit_lr: float = 5e-3


FULL = SpeechSizes()
QUICK = SpeechSizes(
    num_sources=3,
    seconds=0.1,
    n_train=48,
    n_val=16,
    n_test=16,
    base_steps=20,
    base_batch=8,
    ocd_steps=20,
    channels=(16, 8, 16, 2),
    eval_batch=16,
)


# ---------------------------------------------------------------------------------------------- scoring

METRICS = ["si_sdri", "si_sdr"]
HIGHER_IS_BETTER = {"si_sdri": True, "si_sdr": True}


class _Scores:
    """Per-mixture SI-SDR and SI-SDRi (dB, mean over the mixture's sources) of one row."""

    def __init__(self) -> None:
        self.sdr: list[torch.Tensor] = []
        self.sdri: list[torch.Tensor] = []

    def add(self, output: torch.Tensor, mixture: torch.Tensor, sources: torch.Tensor) -> None:
        est, ref = output.transpose(1, 2), sources.transpose(1, 2)
        best, _ = pit_si_sdr(est, ref)
        base = si_sdr(mixture[:, None, :].expand_as(ref), ref).mean(1)
        self.sdr.append(best)
        self.sdri.append(best - base)

    def result(self) -> dict[str, float]:
        return {"si_sdri": float(torch.cat(self.sdri).mean()), "si_sdr": float(torch.cat(self.sdr).mean())}


def ensemble_waveforms(outputs: torch.Tensor) -> torch.Tensor:
    """The mean of several draws' estimates [K, B, T, S], each draw reordered to match the first's sources."""
    first = outputs[0].transpose(1, 2)
    aligned = [first] + [align(o.transpose(1, 2), first) for o in outputs[1:]]
    return torch.stack(aligned).mean(0).transpose(1, 2)


@torch.no_grad()
def score_rows(ocd: Any, test: TensorDataset, store: Any, *, num_samples: int, batch_size: int, seed: int) -> dict:
    """Every row of the table on `test`, with the public API (the core's `evaluate` scores classification
    and regression metrics, not SI-SDR)."""
    from ocd_hf.evaluation import Row
    from ocd_hf.overfit import overfit_batch

    c = ocd.config
    gen = torch.Generator().manual_seed(seed)
    keys = store.column("layer_input").float()
    k_mean, k_std = keys.mean(0), keys.std(0).clamp_min(1e-6)
    keys = (keys - k_mean) / k_std
    mean_scale = float(store.column("scale").mean())
    rows: dict[str, _Scores] = {}
    cos: dict[str, list[torch.Tensor]] = {}

    def add(name: str, out: torch.Tensor, mix: torch.Tensor, src: torch.Tensor) -> None:
        rows.setdefault(name, _Scores()).add(out, mix, src)

    mixes, sources = test.tensors
    for start in range(0, len(mixes), batch_size):
        mix, src = mixes[start : start + batch_size], sources[start : start + batch_size]
        cond, base_out = ocd.conditioning(mix)
        add(Row.BASE, base_out, mix, src)
        with torch.enable_grad():
            oracle = overfit_batch(
                ocd.module,
                ocd.layer,
                mix,
                src,
                pit_loss,
                ocd.adapter.forward,
                c.overfit_steps,
                c.overfit_lr,
                c.overfit_optimizer,
            ).delta
        add(Row.ORACLE, ocd.forward_with_deltas(mix, oracle), mix, src)
        raw = ocd.generate_deltas(cond, num_samples, gen, delta_scale=1.0)
        deltas = raw * ocd.delta_scale
        outs = torch.stack([ocd.forward_with_deltas(mix, d) for d in deltas])
        add(Row.OCD, outs[0], mix, src)
        add(Row.ensemble(num_samples), ensemble_waveforms(outs), mix, src)
        # kept also when calibration left delta_scale at 1 (then it equals OCD), so every seed has the row
        add(Row.OCD_UNCALIBRATED, ocd.forward_with_deltas(mix, raw[0]), mix, src)
        rho = ocd.head.scale_net(ocd.head.normalize(cond)).view(-1, *([1] * (raw[0].dim() - 1)))
        # the same Ω_0 at the mean training scale, uncalibrated like the row it ablates
        add(Row.NO_SCALE, ocd.forward_with_deltas(mix, raw[0] / rho * mean_scale), mix, src)
        nearest = torch.cdist((cond.layer_input.float() - k_mean) / k_std, keys).argmin(1)
        nn_delta = store.get_batch(nearest.numpy())["delta"].to(oracle.dtype).reshape(oracle.shape)
        add(Row.NEAREST_NEIGHBOUR, ocd.forward_with_deltas(mix, nn_delta), mix, src)
        mean_delta = ocd.head.mean_delta.reshape(oracle.shape[1:]).to(oracle.dtype).expand_as(oracle).contiguous()
        add(Row.MEAN_DELTA, ocd.forward_with_deltas(mix, mean_delta), mix, src)
        for name, d in (("OCD (1 draw, delta_scale 1)", raw[0]), (Row.NEAREST_NEIGHBOUR, nn_delta)):
            cos.setdefault(name, []).append(F.cosine_similarity(d.flatten(1), oracle.flatten(1), dim=1))
    return {
        "rows": {name: s.result() for name, s in rows.items()},
        "cosine_to_oracle": {k: float(torch.cat(v).mean()) for k, v in cos.items()},
    }


# ---------------------------------------------------------------------------------------------- one seed


def run_seed(
    seed: int,
    *,
    data_root: str | Path | None = None,
    quick: bool = False,
    sizes: SpeechSizes | None = None,
    progress: bool = False,
) -> dict:
    """Data, base model, OCD fit and every row for one seed (the benchmark contract).

    Args:
        seed: Seeds the mixtures (train, val and test use seed-derived, disjoint streams), the base
            model's initialisation and batches, and OCD's head training and draws.
        data_root: Unused: the mixtures are synthesised (kept for the common signature).
        quick: Toy sizes (seconds), for CI.
        sizes: Overrides the sizes chosen by `quick`.
        progress: tqdm bars of collection, head training and calibration.
    """
    from ocd_hf import OCDTrainer, OCDTrainingArguments, OCDWrapper

    del data_root
    sz = sizes or (QUICK if quick else FULL)
    t0, cpu0 = time.perf_counter(), time.process_time()
    n = int(sz.seconds * SAMPLE_RATE)
    # three streams per seed; the factor keeps different seeds' streams apart
    train, val, test = (
        make_mixtures(num, sz.num_sources, n, 1000 * seed + k)
        for k, num in enumerate((sz.n_train, sz.n_val, sz.n_test))
    )
    t_data = time.perf_counter() - t0
    torch.manual_seed(seed)
    enc, ch, hid, blocks = sz.channels
    model = TasNet(sz.num_sources, enc, ch, hid, blocks)
    train_base(model, train, sz.base_steps, sz.base_batch, seed)
    t_base = time.perf_counter() - t0 - t_data

    ocd = OCDWrapper.from_pretrained(model, layer=model.target_layer, task="regression", overfit_lr=sz.overfit_lr)
    args = OCDTrainingArguments(
        num_train_steps=sz.ocd_steps,
        seed=seed,
        collect_batch_size=64,
        calibration_batch_size=sz.eval_batch,
        progress=progress,
    )
    trainer = OCDTrainer(ocd, args, loss=pit_loss)
    with tempfile.TemporaryDirectory(prefix="ocd-speech-") as collect_dir:
        store = trainer.collect(train, collect_dir)
        trainer.train_head(store)
        calibration = trainer.calibrate(val)
        t_fit = time.perf_counter() - t0 - t_data - t_base
        scored = score_rows(ocd, test, store, num_samples=5, batch_size=sz.eval_batch, seed=seed)
    wall = time.perf_counter() - t0
    layer = ocd.layer
    return {
        "task": "speech",
        "seed": seed,
        "metrics": METRICS,
        "higher_is_better": HIGHER_IS_BETTER,
        "rows": scored["rows"],
        "cosine_to_oracle": scored["cosine_to_oracle"],
        "delta_scale": ocd.delta_scale,
        "calibration": {
            k: calibration[k] for k in ("best", "gain_vs_base", "gain_se", "rule", "min_gain_se") if k in calibration
        },
        "sizes": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(sz).items()},
            "sample_rate": SAMPLE_RATE,
            "layer": ocd.config.layer,
            "layer_weight": list(layer.weight.shape),
            "model_parameters": sum(p.numel() for p in model.parameters()),
        },
        "times_s": {"data": t_data, "base": t_base, "ocd_fit": t_fit, "score": wall - t_data - t_base - t_fit},
        "wall_s": wall,
        # CPU seconds of this process (all its threads): on a shared machine wall time also counts waiting
        "cpu_s": time.process_time() - cpu0,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------- tables

ORACLE_ROW = "oracle, this layer (test label)"
# a row "beats" base by more than this: the per-sample forward at delta_scale 0 matches the base model only
# up to float rounding (about 1e-6 dB), and the tables print 4 decimals
WIN_DB = 1e-4
RIVALS = ("nearest-neighbour delta", "mean-delta control")  # per-mixture deltas without the diffusion model


def _num_sources(run: dict) -> int:
    return int(run["sizes"]["num_sources"])


def _uncalibrated(run: dict) -> float:
    """One OCD draw's SI-SDRi at delta_scale 1 (the OCD row itself when calibration kept the scale at 1)."""
    row = run["rows"].get("OCD at delta_scale 1", run["rows"]["OCD"] if run["delta_scale"] == 1 else None)
    return math.nan if row is None else row["si_sdri"]


def _seconds(runs: list[dict], key: str) -> str:
    return " / ".join(f"{r[key]:.0f}" if key in r else "n/a" for r in runs)


def command_line(counts: list[int], seeds: list[int], quick: bool) -> str:
    """The command that makes these tables (`--num-sources` left out when it is the default, five)."""
    cmd = "python -m benchmarks.task_speech --seeds " + " ".join(map(str, seeds))
    cmd += "" if counts == [FULL.num_sources] else " --num-sources " + " ".join(map(str, counts))
    return cmd + (" --quick" if quick else "")


def _rule(groups: dict[int, list[dict]]) -> str:
    """The calibration rule the runs used, as the records say (older records did not keep it)."""
    from .stats import calibration_rule

    text = calibration_rule(r.get("calibration", {}).get("min_gain_se") for runs in groups.values() for r in runs)
    return f"delta_scale: {text}." if text else "The runs did not record their calibration rule."


def _summary(groups: dict[int, list[dict]]) -> list[str]:
    from .stats import fmt, mean_sd

    def paired(runs: list[dict], value: Any) -> str:
        gains = [value(r) - r["rows"]["base"]["si_sdri"] for r in runs]
        if any(math.isnan(g) for g in gains):
            return "n/a"
        m, sd = mean_sd(gains)
        wins = sum(g > WIN_DB for g in gains)
        return (f"{m:+.4f} ± {sd:.4f}" if len(gains) > 1 else f"{m:+.4f}") + f" ({wins}/{len(gains)})"

    lines = [
        "## Summary over source counts",
        "",
        "SI-SDRi (dB), mean ± SD over seeds. 'best rival' is whichever of the nearest-neighbour delta and the "
        "mean-delta control has the higher mean (named). The last columns are per-seed differences to the base "
        "model, mean ± SD (seeds where the row beat base by more than 1e-4 dB): OCD as shipped (calibrated delta_scale, 0 = off) and "
        "one OCD draw at delta_scale 1. Wall and CPU time (process_time, all threads of the process) are per "
        "seed, in seed order. " + _rule(groups),
        "",
        "| sources | seeds | base | OCD | oracle | best rival | OCD − base | OCD at scale 1 − base "
        "| oracle − base | wall per seed (s) | CPU per seed (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, runs in groups.items():
        col = {k: fmt([r["rows"][k]["si_sdri"] for r in runs]) for k in ("base", "OCD", ORACLE_ROW)}
        rivals = [k for k in RIVALS if all(k in r["rows"] for r in runs)]
        best = max(rivals, key=lambda k: mean_sd([r["rows"][k]["si_sdri"] for r in runs])[0], default=None)
        rival = f"{fmt([r['rows'][best]['si_sdri'] for r in runs])} ({best})" if best else "n/a"
        lines.append(
            f"| {s} | {', '.join(str(r['seed']) for r in runs)} | {col['base']} | {col['OCD']} | {col[ORACLE_ROW]} "
            f"| {rival} | {paired(runs, lambda r: r['rows']['OCD']['si_sdri'])} | {paired(runs, _uncalibrated)} "
            f"| {paired(runs, lambda r: r['rows'][ORACLE_ROW]['si_sdri'])} | {_seconds(runs, 'wall_s')} "
            f"| {_seconds(runs, 'cpu_s')} |"
        )
    return lines


def _markdown_one(runs: list[dict], level: str) -> list[str]:
    """The table of one source count: every row, mean ± SD over seeds, and the per-seed details."""
    from .stats import fmt, mean_sd

    labels = [k for k in runs[0]["rows"] if all(k in r["rows"] for r in runs)]
    partial = [k for r in runs for k in r["rows"] if k not in labels]
    first = runs[0]
    lines = [
        f"{level} Speech separation (synthetic {_num_sources(first)}-source mixtures; "
        f"stand-in for Libri{_num_sources(first)}Mix)",
        "",
        f"Date: {first.get('date', datetime.date.today().isoformat())}, torch {first.get('torch', torch.__version__)}, "
        f"{first.get('threads', 1)} thread(s); seeds {[r['seed'] for r in runs]}.  ",
        "Mean ± SD over seeds. SI-SDRi: SI-SDR improvement over the mixture, dB (higher is better). "
        "Gain: the row's SI-SDRi minus the base model's, per seed, then mean ± SD; "
        "'> 0 in' counts the seeds where the row beat the base model by more than 1e-4 dB.",
        "",
        "| row | SI-SDRi (dB) | SI-SDR (dB) | gain over base (dB) | > 0 in |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        cells = [fmt([r["rows"][label][m] for r in runs]) for m in METRICS]
        gains = [r["rows"][label]["si_sdri"] - r["rows"]["base"]["si_sdri"] for r in runs]
        m, sd = mean_sd(gains)
        gain = f"{m:+.4f} ± {sd:.4f}" if len(gains) > 1 else f"{m:+.4f}"
        wins = sum(g > WIN_DB for g in gains)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gain} | {wins}/{len(gains)} |")
    for label in dict.fromkeys(partial):
        seen = ", ".join(f"seed {r['seed']}: {r['rows'][label]['si_sdri']:.4f}" for r in runs if label in r["rows"])
        lines.append(f"\n{label}, SI-SDRi (dB), only in some records: {seen}.")
    lines += [
        "",
        "| seed | delta_scale | cosine OCD→oracle | wall time (s) | CPU time (s) | data / base / OCD fit / scoring (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        t = r["times_s"]
        cos = r["cosine_to_oracle"].get("OCD (1 draw, delta_scale 1)", math.nan)
        cpu = f"{r['cpu_s']:.0f}" if "cpu_s" in r else "n/a"
        lines.append(
            f"| {r['seed']} | {r['delta_scale']:g} | {cos:.3f} | {r['wall_s']:.0f} | {cpu} | "
            f"{t['data']:.0f} / {t['base']:.0f} / {t['ocd_fit']:.0f} / {t['score']:.0f} |"
        )
    return lines


def _markdown(runs: list[dict], command: str) -> str:
    """speech.md: with one source count, its table; with several, a summary and then one table per count."""
    groups: dict[int, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (_num_sources(r), r["seed"])):
        groups.setdefault(_num_sources(r), []).append(r)
    cmd = f"Command: `{command}`  "
    if len(groups) == 1:
        (only,) = groups.values()
        body = _markdown_one(only, "#")
        return "\n".join([*body[:2], cmd, *body[2:]]) + "\n"
    names = [str(c) for c in sorted(groups)]
    counts = ", ".join(names[:-1]) + " and " + names[-1]
    lines = [f"# Speech separation on synthetic mixtures of {counts} sources (stand-in for LibriMix)", "", cmd, ""]
    lines += _summary(groups)
    # the paper's five sources first, then the others in order
    for s in sorted(groups, key=lambda s: (s != FULL.num_sources, s)):
        lines += ["", *_markdown_one(groups[s], "##")]
    return "\n".join(lines) + "\n"


def run_path(runs_dir: str | Path, num_sources: int, seed: int, quick: bool) -> Path:
    """Where one (source count, seed) record is saved (quick runs apart from full ones)."""
    return Path(runs_dir) / f"speech{'-quick' if quick else ''}-{num_sources}src-seed{seed}.json"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--num-sources",
        type=int,
        nargs="+",
        default=None,
        help="sources per mixture, one or several counts, 2 to 6 (default 5; 3 with --quick); one model each",
    )
    p.add_argument("--quick", action="store_true", help="toy sizes (seconds)")
    p.add_argument("--data-root", default=None, help="unused: the mixtures are synthesised")
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument(
        "--runs-dir",
        default=str(Path(__file__).resolve().parents[1] / "build" / "bench-runs"),
        help="each (source count, seed) record is saved here as it finishes and reused by a rerun",
    )
    p.add_argument("--force", action="store_true", help="rerun the runs that have a saved record")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-only", action="store_true", help="rewrite speech.md from the speech.json in --out-dir")
    args = p.parse_args(argv)
    from .tables import atomic_write

    out = Path(args.out_dir)
    if args.render_only:
        runs = json.loads((out / "speech.json").read_text())
        quick = runs[0]["sizes"]["n_train"] == QUICK.n_train
        counts = sorted({_num_sources(r) for r in runs})
        seeds = sorted({r["seed"] for r in runs})
        atomic_write(out / "speech.md", _markdown(runs, command_line(counts, seeds, quick)))
        return
    base_sizes = QUICK if args.quick else FULL
    counts = args.num_sources or [base_sizes.num_sources]
    bad = [s for s in counts if not 2 <= s <= 6]
    if bad:
        p.error(f"--num-sources {bad}: use 2 to 6 (PIT tries every permutation of the sources).")
    torch.set_num_threads(args.threads)
    runs = []
    for s in counts:
        sizes = dataclasses.replace(base_sizes, num_sources=s)
        for seed in args.seeds:
            path = run_path(args.runs_dir, s, seed, args.quick)
            if path.exists() and not args.force:
                runs.append(json.loads(path.read_text()))
                print(f"{s} sources, seed {seed}: saved record {path}", flush=True)
                continue
            runs.append(run_seed(seed, quick=args.quick, sizes=sizes, progress=True))
            atomic_write(path, json.dumps(runs[-1], indent=1) + "\n")
            print(json.dumps({k: runs[-1][k] for k in ("seed", "rows", "delta_scale", "wall_s", "cpu_s")}, indent=1))
    command = command_line(counts, args.seeds, args.quick)
    atomic_write(out / "speech.json", json.dumps(runs, indent=1) + "\n")
    atomic_write(out / "speech.md", _markdown(runs, command))
    print(_markdown(runs, command))


if __name__ == "__main__":
    main()
