"""A TinyNeRF per procedurally rendered scene, OCD on its first layer (the paper's Tab. 3 setting).

Everything runs offline from a seed:

- `render_view` is a small analytic ray tracer (spheres, axis-aligned boxes, textured plane tiles; Lambert
  shading with a Phong highlight and hard shadows from one directional light, black background). Three scenes
  (`SCENES`) are rendered from cameras on a ring band around the origin: training views at evenly spaced
  azimuths, validation and test views at azimuths and elevations drawn from the seed (held-out viewpoints).
- `TinyNeRF` is positional encoding (L = `NUM_FREQS` = 6, so 3 + 3·2·6 = 39 inputs) and three fully connected
  layers (39 → 128 → 128 → 4), volume rendered along each ray with `num_samples` stratified samples between
  `NEAR` and `FAR` (jittered in training mode, bin midpoints in eval mode). Like the original TinyNeRF it does
  not see the view direction, so the Phong highlight is something only a per-view weight can fit.
- One OCD sample is one view: the input is the view's rays [R, 6] (origin, direction), the output its rendered
  image [R, 3], the loss the view's MSE. The target layer `layer1` sees [rays, samples, 39] per view; OCD's
  per-sample weights work over those extra dims unchanged. Overfitting follows the official code: 10 Adam
  steps at lr 5e-3.
- The conditioning follows the official code too (`NeRFConditioner`, an `ocd_hf.Conditioner`): i_L and the
  post-ReLU a_L pooled over [rays, samples] with the volume-rendering weights (normalised per view), and f an
  image encoding of the base model's own rendering of the view by the packaged EfficientNet-Lite0 (the
  official code used VGG-11 logits). `--conditioning mean` runs the core's default mean pooling instead.

    python -m benchmarks.task_nerf --seeds 0 1 2 [--quick] [--conditioning nerf|mean] [--data-root ../shared/data]

Each seed's record is saved to build/bench-runs/nerf[-mean][-quick]-seed{N}.json as it finishes and reused by a
rerun (`--force` reruns): seeds can run as parallel processes, then one call with all seeds writes the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ocd_hf import Conditioner, Conditioning

NEAR, FAR = 2.0, 6.0  # every scene lies within this depth range of every camera (camera radius 4)
CAMERA_RADIUS = 4.0
FOV_DEG = 45.0
NUM_FREQS = 6
ELEVATIONS_DEG = (20.0, 45.0)  # the camera band
LIGHT_DIR = np.array([0.5, 1.0, 0.3]) / np.linalg.norm([0.5, 1.0, 0.3])  # towards the light
AMBIENT, DIFFUSE, SPECULAR = 0.15, 0.75, 0.6
OVERFIT = dict(overfit_steps=10, overfit_lr=5e-3)  # the official code's NeRF setting
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
ENCODER_FILE = Path("models") / "efficientnet-lite0-57934424.pth"  # under the data root
ENCODER_ARCH = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class Sizes:
    """Image and data-set sizes of one run."""

    image: int
    num_samples: int
    train_views: int
    val_views: int
    test_views: int
    base_steps: int
    rays_per_step: int
    head_steps: int
    encode_size: int  # the rendering is resized to this square before the image encoder


FULL = Sizes(
    image=32,
    num_samples=20,
    train_views=40,
    val_views=8,
    test_views=8,
    base_steps=800,
    rays_per_step=1024,
    head_steps=600,
    encode_size=224,  # EfficientNet-Lite0's training resolution
)
QUICK = Sizes(
    image=8,
    num_samples=12,
    train_views=8,
    val_views=3,
    test_views=3,
    base_steps=100,
    rays_per_step=128,
    head_steps=20,
    encode_size=64,
)


# ---------------------------------------------------------------------------------------------- the renderer
@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float
    color: tuple[float, float, float]
    shininess: float = 32.0


@dataclass(frozen=True)
class Box:
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    color: tuple[float, float, float]
    shininess: float = 16.0


@dataclass(frozen=True)
class Tile:
    """A textured rectangle: centre, unit normal, in-plane axis u (v = n × u), half sizes, two colours.

    texture "checker" alternates the colours on squares of side `period`; "stripes" along u.
    """

    center: tuple[float, float, float]
    normal: tuple[float, float, float]
    u: tuple[float, float, float]
    half: tuple[float, float]
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    texture: str = "checker"
    period: float = 0.5
    shininess: float = 8.0


FLOOR = Tile((0, -0.6, 0), (0, 1, 0), (1, 0, 0), (1.4, 1.4), ((0.9, 0.9, 0.85), (0.25, 0.3, 0.45)))
SCENES: dict[str, tuple[Any, ...]] = {
    "spheres": (
        FLOOR,
        Sphere((-0.55, -0.15, 0.2), 0.45, (0.9, 0.2, 0.15)),
        Sphere((0.5, -0.3, -0.35), 0.3, (0.2, 0.8, 0.3)),
        Sphere((0.35, 0.1, 0.6), 0.35, (0.2, 0.35, 0.95), shininess=64.0),
    ),
    "boxes": (
        FLOOR,
        Box((-0.9, -0.6, -0.6), (-0.2, 0.2, 0.1), (0.95, 0.75, 0.15)),
        Box((0.2, -0.6, 0.1), (0.8, -0.1, 0.7), (0.6, 0.2, 0.8)),
        Sphere((0.45, -0.3, -0.6), 0.3, (0.1, 0.75, 0.8)),
    ),
    "planes": (
        Tile((0, -0.6, 0), (0, 1, 0), (1, 0, 0), (1.3, 1.3), ((0.95, 0.55, 0.2), (0.2, 0.2, 0.25)), "checker", 0.35),
        Tile((0, 0.1, -0.8), (0, 0, 1), (1, 0, 0), (1.0, 0.7), ((0.85, 0.85, 0.9), (0.8, 0.15, 0.2)), "stripes", 0.3),
        Tile((-0.9, 0.0, 0.2), (1, 0, 0), (0, 0, 1), (0.6, 0.6), ((0.2, 0.7, 0.3), (0.95, 0.95, 0.6)), "checker", 0.4),
        Sphere((0.3, -0.2, 0.2), 0.4, (0.9, 0.9, 0.9), shininess=64.0),
    ),
}


def _intersect(obj: Any, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays (o, d) [N, 3] with one object: t [N] (inf on a miss), normal [N, 3], albedo [N, 3]."""
    n = len(o)
    if isinstance(obj, Sphere):
        oc = o - np.asarray(obj.center)
        b = np.einsum("ij,ij->i", oc, d)
        c = np.einsum("ij,ij->i", oc, oc) - obj.radius**2
        disc = b * b - c
        sq = np.sqrt(np.maximum(disc, 0.0))
        t0, t1 = -b - sq, -b + sq
        t = np.where(t0 > 1e-4, t0, np.where(t1 > 1e-4, t1, np.inf))
        t = np.where(disc >= 0, t, np.inf)
        p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
        normal = (p - np.asarray(obj.center)) / obj.radius
        return t, normal, np.broadcast_to(np.asarray(obj.color, float), (n, 3))
    if isinstance(obj, Box):
        lo, hi = np.asarray(obj.lo, float), np.asarray(obj.hi, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            ta, tb = (lo - o) * inv, (hi - o) * inv
        ta, tb = np.nan_to_num(ta, nan=-np.inf), np.nan_to_num(tb, nan=np.inf)
        tmin, tmax = np.minimum(ta, tb), np.maximum(ta, tb)
        t_near, t_far = tmin.max(1), tmax.min(1)
        hit = (t_near <= t_far) & (t_far > 1e-4)
        t = np.where(hit, np.where(t_near > 1e-4, t_near, t_far), np.inf)
        axis = tmin.argmax(1)  # the slab entered last is the face hit
        normal = np.zeros((n, 3))
        normal[np.arange(n), axis] = -np.sign(d[np.arange(n), axis])
        return t, normal, np.broadcast_to(np.asarray(obj.color, float), (n, 3))
    if isinstance(obj, Tile):
        c, nrm, u = (np.asarray(v, float) for v in (obj.center, obj.normal, obj.u))
        v = np.cross(nrm, u)
        denom = d @ nrm
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((c - o) @ nrm) / denom
        p = o + np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)[:, None] * d
        a, bb = (p - c) @ u, (p - c) @ v
        inside = (np.abs(a) <= obj.half[0]) & (np.abs(bb) <= obj.half[1]) & (np.abs(denom) > 1e-9) & (t > 1e-4)
        t = np.where(inside, t, np.inf)
        k = np.floor(a / obj.period).astype(int)
        if obj.texture == "checker":
            k = k + np.floor(bb / obj.period).astype(int)
        albedo = np.where((k % 2 == 0)[:, None], np.asarray(obj.colors[0]), np.asarray(obj.colors[1]))
        normal = np.broadcast_to(np.where(denom[:, None] > 0, -nrm, nrm), (n, 3))  # two-sided
        return t, normal, albedo
    raise TypeError(f"Unknown scene object {type(obj).__name__}.")


def trace(
    scene: tuple[Any, ...], o: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit over the scene: t [N] (inf: miss), normal, albedo [N, 3] and the object's shininess [N]."""
    best_t = np.full(len(o), np.inf)
    normal, albedo, shin = np.zeros((len(o), 3)), np.zeros((len(o), 3)), np.ones(len(o))
    for obj in scene:
        t, nrm, alb = _intersect(obj, o, d)
        closer = t < best_t
        best_t = np.where(closer, t, best_t)
        normal = np.where(closer[:, None], nrm, normal)
        albedo = np.where(closer[:, None], alb, albedo)
        shin = np.where(closer, obj.shininess, shin)
    return best_t, normal, albedo, shin


def shade(scene: tuple[Any, ...], o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Colour [N, 3] in [0, 1] of rays (o, d): ambient + Lambert + Phong highlight, shadows, black background."""
    t, normal, albedo, shin = trace(scene, o, d)
    hit = np.isfinite(t)
    p = o + np.where(hit, t, 0.0)[:, None] * d
    light = np.broadcast_to(LIGHT_DIR, p.shape)
    shadow_t = trace(scene, p + 1e-3 * normal, light)[0]
    lit = (~np.isfinite(shadow_t)).astype(float)
    ndl = np.maximum(np.einsum("ij,ij->i", normal, light), 0.0)
    refl = 2 * ndl[:, None] * normal - light
    spec = np.maximum(np.einsum("ij,ij->i", refl, -d), 0.0) ** shin * (ndl > 0)
    color = albedo * (AMBIENT + DIFFUSE * ndl * lit)[:, None] + SPECULAR * (spec * lit)[:, None]
    return np.where(hit[:, None], np.clip(color, 0.0, 1.0), 0.0)


def camera_rays(azimuth: float, elevation: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rays (origins, unit directions) [size², 3] of a pinhole camera on the ring looking at the origin."""
    eye = CAMERA_RADIUS * np.array(
        [math.cos(elevation) * math.sin(azimuth), math.sin(elevation), math.cos(elevation) * math.cos(azimuth)]
    )
    fwd = -eye / np.linalg.norm(eye)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    focal = 0.5 * size / math.tan(math.radians(FOV_DEG) / 2)
    j, i = np.meshgrid(np.arange(size) + 0.5 - size / 2, np.arange(size) + 0.5 - size / 2)
    d = j.reshape(-1, 1) * right - i.reshape(-1, 1) * up + focal * fwd
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.broadcast_to(eye, d.shape).copy(), d


def render_view(scene: tuple[Any, ...], azimuth: float, elevation: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rays [size², 6] = origin, direction; image [size², 3]) of one view."""
    o, d = camera_rays(azimuth, elevation, size)
    return np.concatenate([o, d], 1), shade(scene, o, d)


def view_poses(seed: int, sizes: Sizes) -> dict[str, list[tuple[float, float]]]:
    """(azimuth, elevation) per split: training views evenly spaced, validation and test drawn from the seed."""
    lo, hi = (math.radians(e) for e in ELEVATIONS_DEG)
    n = sizes.train_views
    train = [(2 * math.pi * k / n, lo + (hi - lo) * (k % 3) / 2) for k in range(n)]
    rng = np.random.default_rng(seed)

    def drawn(m: int) -> list[tuple[float, float]]:
        return [(float(a), float(e)) for a, e in zip(rng.uniform(0, 2 * math.pi, m), rng.uniform(lo, hi, m))]

    return {"train": train, "val": drawn(sizes.val_views), "test": drawn(sizes.test_views)}


def scene_dataset(scene: tuple[Any, ...], poses: list[tuple[float, float]], size: int) -> TensorDataset:
    """Views as a TensorDataset of (rays [R, 6], image [R, 3]), float32."""
    views = [render_view(scene, a, e, size) for a, e in poses]
    rays = torch.tensor(np.stack([v[0] for v in views]), dtype=torch.float32)
    images = torch.tensor(np.stack([v[1] for v in views]), dtype=torch.float32)
    return TensorDataset(rays, images)


# ---------------------------------------------------------------------------------------------- TinyNeRF
def positional_encoding(x: torch.Tensor, num_freqs: int = NUM_FREQS) -> torch.Tensor:
    """[..., 3] -> [..., 3 + 3·2·num_freqs]: x, then sin(2^k x) and cos(2^k x) for k < num_freqs (TinyNeRF's order)."""
    parts = [x]
    for k in range(num_freqs):
        parts += [torch.sin(2.0**k * x), torch.cos(2.0**k * x)]
    return torch.cat(parts, -1)


def sample_depths(shape: tuple[int, ...], num_samples: int, jitter: bool, device: torch.device) -> torch.Tensor:
    """Stratified depths [*shape, num_samples] in [NEAR, FAR]: one per equal bin, uniform in it or at its middle."""
    u = (
        torch.rand(*shape, num_samples, device=device)
        if jitter
        else torch.full((*shape, num_samples), 0.5, device=device)
    )
    return NEAR + (FAR - NEAR) * (torch.arange(num_samples, device=device) + u) / num_samples


def volume_render(rgb: torch.Tensor, sigma: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Composite along each ray: C = Σ_i T_i α_i c_i with α_i = 1 − exp(−σ_i δ_i), T_i = Π_{j<i} (1 − α_j).

    δ_i is the distance to the next sample (to FAR for the last); the background is black.

    Args:
        rgb: colours [..., S, 3].
        sigma: densities [..., S] (non-negative).
        depths: sample depths [..., S], increasing.

    Returns:
        The colour [..., 3] and the weights T_i α_i [..., S].
    """
    far = torch.full_like(depths[..., :1], FAR)
    delta = torch.cat([depths[..., 1:], far], -1) - depths
    alpha = 1.0 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], -1), -1)[..., :-1]
    weights = alpha * trans
    return (weights[..., None] * rgb).sum(-2), weights


class TinyNeRF(nn.Module):
    """Positional encoding + three fully connected layers (in → width → width → rgb, σ), volume rendered.

    forward(rays [B, R, 6]) -> image [B, R, 3]; `layer1` (width × (3 + 6·num_freqs)) is OCD's target.
    Samples are jittered in training mode and fixed in eval mode, so eval forwards are deterministic.
    """

    def __init__(self, num_samples: int = 32, num_freqs: int = NUM_FREQS, width: int = 128):
        super().__init__()
        self.num_samples, self.num_freqs = num_samples, num_freqs
        self.layer1 = nn.Linear(3 + 6 * num_freqs, width)
        self.layer2 = nn.Linear(width, width)
        self.layer3 = nn.Linear(width, 4)

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        o, d = rays[..., :3], rays[..., 3:]
        depths = sample_depths(o.shape[:-1], self.num_samples, self.training, rays.device)
        points = o[..., None, :] + depths[..., None] * d[..., None, :]  # [B, R, S, 3]
        return volume_render(*self.tail(self.layer1(positional_encoding(points, self.num_freqs))), depths)[0]

    def tail(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Colour [..., 3] and density [...] of the samples whose `layer1` output (before its ReLU) is h."""
        raw = self.layer3(torch.relu(self.layer2(torch.relu(h))))
        return torch.sigmoid(raw[..., :3]), torch.relu(raw[..., 3])

    def volume_weights(self, h: torch.Tensor) -> torch.Tensor:
        """The volume-rendering weights T_i α_i [..., S] of an eval-mode forward whose `layer1` output was h.

        Eval-mode depths are the fixed bin midpoints, so the weights follow from h alone: this is what the
        forward computed, recomputed from what OCD's capture sees, without state kept on the model.
        """
        depths = sample_depths(h.shape[:-2], self.num_samples, False, h.device).to(h.dtype)
        return volume_render(*self.tail(h), depths)[1]


# ---------------------------------------------------------------------------------------------- the conditioning
def weighted_pool(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_{r,s} w_rs v_rs / Σ_{r,s} w_rs per view: weights [B, R, S], values [B, R, S, D] -> [B, D].

    A view whose weights are all zero (nothing rendered) pools to zeros.
    """
    w = weights / weights.sum((1, 2), keepdim=True).clamp_min(1e-12)
    return torch.einsum("brs,brsd->bd", w.to(values.dtype), values)


def load_encoder(path: str | Path) -> nn.Module:
    """The packaged EfficientNet-Lite0 (timm `tf_efficientnet_lite0`, ImageNet weights), in eval mode.

    The state dict's tensors match timm's in shape and order, under other names.
    """
    import timm

    model = timm.create_model(ENCODER_ARCH, pretrained=False)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if len(sd) != len(model.state_dict()) or any(
        a.shape != b.shape for a, b in zip(model.state_dict().values(), sd.values())
    ):
        raise ValueError(f"{path} does not hold {ENCODER_ARCH} weights (tensor count or shapes differ).")
    model.load_state_dict(dict(zip(model.state_dict(), sd.values())))
    return model.eval().requires_grad_(False)


def find_encoder(data_root: str | Path | None) -> tuple[nn.Module | None, str]:
    """(the encoder, how f is made) from `data_root`/models; (None, the reason) when its weights are absent."""
    path = Path(data_root or DEFAULT_DATA) / ENCODER_FILE
    if not path.exists():
        return None, (
            f"mean rendered colour: no EfficientNet-Lite0 weights at {path} (pass --data-root with "
            f"{ENCODER_FILE}), so f falls back to the core's mean pooling of the rendering"
        )
    return load_encoder(path), f"EfficientNet-Lite0 ImageNet logits (1000) of the rendering, from {path}"


class NeRFConditioner(Conditioner):
    """I(x) of one view as the official code made it: volume-weighted pooling and an encoding of the rendering.

    i_L (the positional encodings) and a_L (`layer1`'s output after its ReLU) are pooled over [rays, samples]
    with the volume-rendering weights, normalised per view, so empty space along a ray does not count. f is the
    encoder's 1,000 ImageNet logits of the base model's rendering of the view (as the official code took VGG-11's
    logits; they matched the training views' deltas a little better than the 1,280 pooled features, see
    docs/examples/nerf.md): the rendering resized to `encode_size` and scaled as the weights expect
    ((x·255 − 127) / 128). Without an encoder f is the mean rendered colour.

    Args:
        model: The TinyNeRF (its `volume_weights` gives the weights from `layer1`'s output).
        image_size: Side of the square rendering (rays per view = image_size²).
        encoder: An image model with timm's `forward_features` / `forward_head`, or None.
        encode_size: Side the rendering is resized to before the encoder.
    """

    def __init__(self, model: TinyNeRF, image_size: int, encoder: nn.Module | None = None, encode_size: int = 224):
        self.model, self.image_size, self.encoder, self.encode_size = model, image_size, encoder, encode_size
        self.name = "nerf-volume-weights+" + ("efficientnet-lite0" if encoder is not None else "mean-colour")

    def __call__(self, layer_input, layer_output, model_output, channels_first=False) -> Conditioning:
        weights = self.model.volume_weights(layer_output)
        i_l = weighted_pool(weights, layer_input)
        a_l = weighted_pool(weights, torch.relu(layer_output))
        return Conditioning(i_l, a_l, self.encode(model_output))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Renderings [B, R, 3] -> [B, 1000] encoder logits ([B, 3] mean colour without an encoder)."""
        if self.encoder is None:
            return images.mean(1)
        side = self.image_size
        x = images.reshape(-1, side, side, 3).permute(0, 3, 1, 2).clamp(0, 1).float()
        x = nn.functional.interpolate(x, size=self.encode_size, mode="bilinear", align_corners=False)
        e = self.encoder
        return e.forward_head(e.forward_features((x * 255 - 127) / 128)).to(images.dtype)


def train_base(dataset: TensorDataset, sizes: Sizes, seed: int) -> TinyNeRF:
    """Fit a TinyNeRF to the training views: Adam on random ray batches drawn from all views, MSE."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rays, images = (t.reshape(-1, t.shape[-1]) for t in dataset.tensors)
    model = TinyNeRF(sizes.num_samples)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, sizes.base_steps, eta_min=5e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(sizes.base_steps), desc="TinyNeRF", disable=sizes.base_steps < 500, leave=False):
        idx = torch.randint(0, len(rays), (sizes.rays_per_step,), generator=g)
        loss = (model(rays[idx][None]) - images[idx][None]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


MAX_BASE_RESTARTS = 3  # base models retrained from a new initialisation when one renders nothing


@torch.no_grad()
def renders_nothing(model: TinyNeRF, rays: torch.Tensor, views_per_pass: int = 8) -> bool:
    """Whether every eval-mode rendering of `rays` [V, R, 6] is exactly black: the density died (σ = 0 on every
    sample, the ReLU on σ closed for good), so no weight gets a gradient and OCD has nothing to learn."""
    return all(float(model(rays[v : v + views_per_pass]).amax()) == 0.0 for v in range(0, len(rays), views_per_pass))


def train_live_base(dataset: TensorDataset, sizes: Sizes, seed: int) -> tuple[TinyNeRF, int]:
    """`train_base`, retrained from seed + 1000·k (k = 1, 2, ...) while the result renders nothing.

    Returns the model and k, the number of restarts (0 almost always; recorded per scene).

    Raises:
        RuntimeError: every attempt collapsed.
    """
    for restart in range(MAX_BASE_RESTARTS + 1):
        model = train_base(dataset, sizes, seed + 1000 * restart)
        if not renders_nothing(model, dataset.tensors[0]):
            return model, restart
    raise RuntimeError(
        f"The TinyNeRF's density collapsed to zero in all {MAX_BASE_RESTARTS + 1} trainings (seed {seed})."
    )


# ---------------------------------------------------------------------------------------------- OCD per scene
def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio (images in [0, 1]) of a mean squared error."""
    return -10.0 * math.log10(max(mse, 1e-12))


def fit_scene(
    model: TinyNeRF,
    splits: dict[str, TensorDataset],
    sizes: Sizes,
    seed: int,
    keep: bool = False,
    conditioner: Conditioner | None = None,
) -> dict[str, Any]:
    """Fit OCD on `layer1` of one scene's TinyNeRF and score every row on the test views.

    Returns {"rows": {label: {"mse", "psnr"}}, "health", "delta_scale", ...}; with `keep`, also the wrapper,
    and the base / OCD / oracle renders of the test views (for the figure). `conditioner`: how I(x) is made
    (None: the core's mean pooling).
    """
    from ocd_hf import OCDTrainer, OCDTrainingArguments, OCDWrapper
    from ocd_hf.evaluation import Row, evaluate
    from ocd_hf.overfit import overfit_batch

    ocd = OCDWrapper.from_pretrained(
        model, layer="layer1", loss="mse", task="regression", conditioner=conditioner, **OVERFIT
    )
    args = OCDTrainingArguments(
        num_train_steps=sizes.head_steps, seed=seed, collect_batch_size=8, train_batch_size=16, progress=False
    )
    trainer = OCDTrainer(ocd, args, loss="mse")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as deltas:
        store = trainer.collect(splits["train"], deltas)
        trainer.train_head(store)
        out["calibration"] = {
            k: v
            for k, v in trainer.calibrate(splits["val"]).items()
            if k in ("delta_scale", "gain_vs_base", "gain_se", "rule", "min_gain_se")
        }
        report = evaluate(ocd, splits["test"], num_samples=5, seed=seed, batch_size=8, collection=store, progress=False)
    out["rows"] = {name: {"mse": r["rmse"] ** 2, "psnr": psnr(r["rmse"] ** 2)} for name, r in report.rows.items()}
    # evaluate() adds this row only when calibration moved delta_scale off 1; otherwise it is the OCD row,
    # and every scene needs the same rows to be averaged
    out["rows"].setdefault(Row.OCD_UNCALIBRATED, out["rows"][Row.OCD])
    out["cosine_to_oracle"] = report.cosine_to_oracle
    out["health"] = report.health
    out["delta_scale"] = ocd.delta_scale
    if keep:
        rays, images = splits["test"].tensors
        cond, base = ocd.conditioning(rays)
        gen = torch.Generator().manual_seed(seed)
        ocd_img = ocd.forward_with_deltas(rays, ocd.generate_deltas(cond, 1, gen)[0])
        with torch.enable_grad():
            c = ocd.config
            oracle = overfit_batch(
                ocd.module, ocd.layer, rays, images, ocd.loss_fn, ocd.adapter.forward, c.overfit_steps, c.overfit_lr
            )
        out["renders"] = {
            "base": base,
            "OCD": ocd_img,
            "oracle": ocd.forward_with_deltas(rays, oracle.delta),
            "ground truth": images,
        }
        out["ocd"] = ocd
    return out


CONDITIONINGS = ("nerf", "mean")


def run_seed(
    seed: int,
    *,
    data_root: str | Path | None = None,
    quick: bool = False,
    keep: bool = False,
    conditioning: str = "nerf",
    scenes: list[str] | None = None,
    scene_dir: str | Path | None = None,
) -> dict:
    """Render the scenes, train a TinyNeRF and fit OCD per scene; rows averaged over scenes.

    Args:
        seed: seeds the held-out viewpoints, the base models, the heads and the draws.
        data_root: the folder with models/efficientnet-lite0-57934424.pth (the image encoder of f); the
            scenes themselves are rendered here.
        quick: tiny sizes (8×8 images) that run in seconds.
        keep: also return per scene the wrapper and the test renders (`fit_scene`), not JSON-able.
        conditioning: "nerf" (`NeRFConditioner`) or "mean" (the core's mean pooling).
        scenes: which of `SCENES` (all when None).
        scene_dir: each scene's result is saved here (`scene_path`) and reused when present, so the scenes of
            one seed can run as separate processes. Not with `keep`.

    The record's `wall_s` and `cpu_s` are the sums over its scenes (each scene's are in `times`).
    """
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"conditioning={conditioning!r}; choose one of {CONDITIONINGS}.")
    torch.set_num_threads(1)
    sizes = QUICK if quick else FULL
    encoder, f_made = None, "mean rendered colour (the core's mean pooling)"
    if conditioning == "nerf":
        encoder, f_made = find_encoder(data_root)
        if encoder is None:
            warnings.warn(f"TinyNeRF conditioning: f is the {f_made}.", stacklevel=2)
            print(f"NOTE: f is the {f_made}", file=sys.stderr, flush=True)
    poses = view_poses(seed, sizes)
    per_group, kept, times = {}, {}, {}
    for name in scenes or list(SCENES):
        cache = None if scene_dir is None or keep else scene_path(scene_dir, seed, name, quick, conditioning)
        if cache is not None and cache.exists():
            saved = json.loads(cache.read_text())
            per_group[name], times[name] = saved["result"], saved["times"]
            continue
        ts, cs = time.perf_counter(), time.process_time()
        splits = {split: scene_dataset(SCENES[name], p, sizes.image) for split, p in poses.items()}
        model, restarts = train_live_base(splits["train"], sizes, seed)
        tb = time.perf_counter()
        conditioner = (
            NeRFConditioner(model, sizes.image, encoder, sizes.encode_size) if conditioning == "nerf" else None
        )
        result = fit_scene(model, splits, sizes, seed, keep=keep, conditioner=conditioner)
        result["base_restarts"] = restarts
        times[name] = {
            "base_s": tb - ts,
            "ocd_s": time.perf_counter() - tb,
            "wall_s": time.perf_counter() - ts,
            "cpu_s": time.process_time() - cs,  # this process's CPU time: less sensitive to the machine's load
        }
        if keep:
            kept[name] = {"renders": result.pop("renders"), "ocd": result.pop("ocd")}
        per_group[name] = result
        if cache is not None:
            from benchmarks.tables import atomic_write

            atomic_write(cache, json.dumps({"result": result, "times": times[name]}, indent=1) + "\n")
    labels = [k for k in next(iter(per_group.values()))["rows"] if all(k in g["rows"] for g in per_group.values())]
    rows = {}
    for label in labels:
        mse = float(np.mean([g["rows"][label]["mse"] for g in per_group.values()]))
        rows[label] = {"mse": mse, "psnr": float(np.mean([g["rows"][label]["psnr"] for g in per_group.values()]))}
    record = {
        "task": "nerf",
        "seed": seed,
        "metrics": ["mse", "psnr"],
        "higher_is_better": {"mse": False, "psnr": True},
        "rows": rows,
        "per_group": per_group,
        "sizes": {
            **sizes.__dict__,
            "scenes": list(per_group),
            "layer": "layer1",
            "weight_shape": [128, 3 + 6 * NUM_FREQS],
            **OVERFIT,
        },
        "conditioning": {
            "name": conditioning,
            "i_L, a_L": "pooled with the volume-rendering weights (a_L after its ReLU)"
            if conditioning == "nerf"
            else "mean over rays and samples",
            "f": f_made,
        },
        "times": times,
        "wall_s": sum(t.get("wall_s", t["base_s"] + t["ocd_s"]) for t in times.values()),
        "cpu_s": sum(t.get("cpu_s", float("nan")) for t in times.values()),
    }
    if keep:
        record["kept"] = kept
    return record


PANELS = ("base", "OCD", "oracle", "ground truth")


def save_figure(record: dict, path: str | Path, view: int = 0) -> None:
    """One test view per scene (rows): base / OCD / oracle / ground truth, with each render's MSE.

    Args:
        record: a `run_seed(..., keep=True)` record.
        path: the PNG to write.
        view: which test view.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = record["kept"]
    fig, axes = plt.subplots(len(kept), len(PANELS), figsize=(1.6 * len(PANELS), 1.7 * len(kept)), squeeze=False)
    for r, (scene, parts) in enumerate(kept.items()):
        renders = parts["renders"]
        truth = renders["ground truth"][view]
        side = int(round(truth.shape[0] ** 0.5))
        for c, name in enumerate(PANELS):
            img = renders[name][view]
            ax = axes[r, c]
            ax.imshow(img.reshape(side, side, 3).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            mse = float((img - truth).pow(2).mean())
            ax.set_title(name if name == "ground truth" else f"{name}\nMSE {mse:.4f}", fontsize=7)
            if c == 0:
                ax.set_ylabel(scene, fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def to_markdown(records: list[dict], command: str, compare: list[dict] | None = None) -> str:
    """Mean ± SD over seeds (one row per label; MSE and PSNR, each averaged over the scenes first).

    Args:
        records: one `run_seed` record per seed.
        command: the command that made them.
        compare: records of the other conditioning (e.g. the mean pooling) for the seeds they share: adds a
            paired OCD comparison.
    """
    from benchmarks.stats import calibration_rule, fmt, mean_sd, paired, paired_verdict

    labels = list(records[0]["rows"])
    cond = records[0].get("conditioning", {"name": "mean", "f": "mean rendered colour"})
    f_text = cond["f"]
    if " from " in f_text:  # the encoder's file, without this machine's folders
        f_text, path = f_text.rsplit(" from ", 1)
        f_text = f_text.rstrip(",") + f", from `{Path(path).name}` under `--data-root`"
    lines = [
        "# TinyNeRF on rendered scenes (paper Tab. 3)",
        "",
        f"`{command}` — {datetime.now(timezone.utc):%Y-%m-%d}, torch {torch.__version__}, {platform.machine()}, "
        f"seeds {[r['seed'] for r in records]}; per seed wall / CPU time: "
        + ", ".join(f"{r['wall_s']:.0f} s / {r['cpu_s']:.0f} s" for r in records),
        "",
        f"Conditioning `{cond['name']}`: i_L, a_L {cond.get('i_L, a_L', 'mean over rays and samples')}; f: {f_text}.",
        "",
        "Test views (held-out viewpoints) of 3 scenes; MSE and PSNR averaged over the scenes, then mean ± SD over seeds.",
        "",
        "| row | MSE | PSNR (dB) |",
        "|---|---|---|",
    ]
    for label in labels:
        lines.append(
            f"| {label} | {fmt([r['rows'][label]['mse'] for r in records])} | "
            f"{fmt([r['rows'][label]['psnr'] for r in records])} |"
        )
    mse = {label: (lambda r, label=label: r["rows"][label]["mse"]) for label in labels}
    lines += ["", "OCD against the other rows, MSE paired per seed (`benchmarks.stats`; negative: OCD lower):", ""]
    for other in labels:
        if other not in ("OCD", "oracle, this layer (test label)") and not other.startswith(("OCD x", "OCD mean")):
            lines.append("- " + paired_verdict(paired(records, mse["OCD"], mse[other]), "MSE", "OCD", other))
    oracle = "oracle, this layer (test label)"
    if oracle in mse:
        share = [(mse["base"](r) - mse["OCD"](r)) / (mse["base"](r) - mse[oracle](r)) for r in records]
        m, sd = mean_sd(share)
        lines += [
            "",
            f"Share of the base-to-oracle MSE gap that OCD closes: {m:.0%} ± {sd:.0%} (per seed, then mean ± SD).",
        ]
    scenes = list(records[0]["per_group"])
    for metric, title in (("mse", "MSE"), ("psnr", "PSNR in dB")):
        lines += ["", f"Per scene ({title}, mean ± SD over seeds):", "", "| row | " + " | ".join(scenes) + " |"]
        lines.append("|---|" + "---|" * len(scenes))
        for label in labels:
            cells = [fmt([r["per_group"][s]["rows"][label][metric] for r in records]) for s in scenes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    scales = {s: [r["per_group"][s]["delta_scale"] for r in records] for s in records[0]["per_group"]}
    lines += ["", "Calibrated delta_scale per scene and seed: " + json.dumps(scales)]
    rule = calibration_rule(r["per_group"][s]["calibration"].get("min_gain_se") for r in records for s in scenes)
    lines[-1] += f" ({rule})." if rule else ""
    if compare:
        lines += comparison(records, compare)
    return "\n".join(lines) + "\n"


def comparison(records: list[dict], other: list[dict]) -> list[str]:
    """Markdown lines: each OCD row under both conditionings on the seeds both have, and the paired difference."""
    from benchmarks.stats import fmt

    by_seed = {r["seed"]: r for r in other}
    pairs = [(r, by_seed[r["seed"]]) for r in records if r["seed"] in by_seed]
    if not pairs:
        return []
    name = pairs[0][0].get("conditioning", {}).get("name", "?")
    other_name = pairs[0][1].get("conditioning", {}).get("name", "mean")
    seeds = [a["seed"] for a, _ in pairs]
    lines = [
        "",
        f"Conditioning `{name}` against `{other_name}` on seeds {seeds} (same base models, views and head seeds; "
        f"MSE, mean ± SD over seeds; difference = {name} − {other_name} per seed, negative: {name} better):",
        "",
        f"| row | {name} | {other_name} | difference | seeds {name} better |",
        "|---|---|---|---|---|",
    ]
    for label in pairs[0][0]["rows"]:
        if label not in pairs[0][1]["rows"]:
            continue
        a = [p[0]["rows"][label]["mse"] for p in pairs]
        b = [p[1]["rows"][label]["mse"] for p in pairs]
        d = [x - y for x, y in zip(a, b)]
        wins = sum(x < -1e-9 for x in d)
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(d)} | {wins}/{len(d)} |")
    return lines


def scene_path(runs_dir: str | Path, seed: int, scene: str, quick: bool, conditioning: str = "nerf") -> Path:
    """Where one scene's result of one seed is saved (`run_seed(scene_dir=...)`)."""
    seed_record = run_path(runs_dir, seed, quick, conditioning)
    return seed_record.with_name(f"{seed_record.stem}-{scene}.json")


def run_path(runs_dir: str | Path, seed: int, quick: bool, conditioning: str = "nerf") -> Path:
    """Where one seed's record is saved (quick runs and the mean-pooling conditioning apart)."""
    tag = ("-mean" if conditioning == "mean" else "") + ("-quick" if quick else "")
    return Path(runs_dir) / f"nerf{tag}-seed{seed}.json"


def main(argv: list[str] | None = None) -> None:
    from benchmarks.tables import atomic_write

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--data-root",
        default=str(DEFAULT_DATA),
        help=f"the folder with {ENCODER_FILE} (f's image encoder); without it f falls back to the mean colour",
    )
    p.add_argument("--conditioning", choices=CONDITIONINGS, default="nerf")
    p.add_argument("--out-dir", default="docs/results")
    p.add_argument("--runs-dir", default=str(ROOT / "build" / "bench-runs"), help="per-seed records, reused by a rerun")
    p.add_argument("--force", action="store_true", help="rerun seeds (and scenes) whose record is saved")
    p.add_argument(
        "--scenes",
        nargs="+",
        choices=list(SCENES),
        default=None,
        help="run only these scenes, saving each one's result in --runs-dir (a later call with all scenes "
        "assembles the seed from them): the scenes of a seed can run as parallel processes",
    )
    p.add_argument("--figure", default=None, help="also save the first seed's figure (save_figure) here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = (
        "python -m benchmarks.task_nerf --seeds "
        + " ".join(map(str, args.seeds))
        + (" --quick" if args.quick else "")
        + (" --conditioning mean" if args.conditioning == "mean" else "")
    )
    out = Path(args.out_dir)
    records = []
    for seed in args.seeds:
        path = run_path(args.runs_dir, seed, args.quick, args.conditioning)
        subset = args.scenes is not None and set(args.scenes) != set(SCENES)
        if path.exists() and not args.force and not subset:
            records.append(json.loads(path.read_text()))
            print(f"seed {seed}: saved record {path}", flush=True)
            continue
        if args.force:
            for name in args.scenes or SCENES:
                scene_path(args.runs_dir, seed, name, args.quick, args.conditioning).unlink(missing_ok=True)
        figure = bool(args.figure) and seed == args.seeds[0] and not subset
        record = run_seed(
            seed,
            data_root=args.data_root,
            quick=args.quick,
            keep=figure,
            conditioning=args.conditioning,
            scenes=args.scenes,
            scene_dir=args.runs_dir,
        )
        if subset:
            print(f"seed {seed}: scenes {args.scenes} saved in {args.runs_dir}", flush=True)
            continue
        if "kept" in record:
            save_figure(record, args.figure)
            del record["kept"]
        atomic_write(path, json.dumps(record, indent=1) + "\n")
        records.append(record)
        print(json.dumps({"seed": seed, "rows": record["rows"], "wall_s": record["wall_s"]}), flush=True)
    if not records:
        return
    other = "mean" if args.conditioning == "nerf" else "nerf"
    compare = [
        json.loads(q.read_text())
        for seed in args.seeds
        if (q := run_path(args.runs_dir, seed, args.quick, other)).exists()
    ]
    stem = "nerf" if args.conditioning == "nerf" else "nerf-mean"
    atomic_write(out / f"{stem}.json", json.dumps(records, indent=1) + "\n")
    atomic_write(out / f"{stem}.md", to_markdown(records, command, compare))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
