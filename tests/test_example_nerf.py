"""The TinyNeRF task (benchmarks/task_nerf.py): renderer, positional encoding, volume rendering, and the
example's --quick run end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import task_nerf as tn

ROOT = Path(__file__).resolve().parents[1]


def test_ray_hits_sphere_at_the_known_point():
    sphere = tn.Sphere((0.0, 0.0, 0.0), 1.0, (1.0, 0.0, 0.0))
    o = np.array([[0.0, 0.0, -5.0], [0.0, 2.0, -5.0], [0.0, 0.0, 0.0]])
    d = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    t, normal, albedo, _ = tn.trace((sphere,), o, d)
    assert t[0] == pytest.approx(4.0)
    np.testing.assert_allclose(normal[0], [0.0, 0.0, -1.0], atol=1e-12)
    assert math.isinf(t[1])  # passes above the sphere
    assert t[2] == pytest.approx(1.0)  # from inside: the far side
    np.testing.assert_allclose(albedo[0], [1.0, 0.0, 0.0])


def test_box_and_tile_hits():
    box = tn.Box((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0), (0.0, 1.0, 0.0))
    tile = tn.Tile((0, 0, 0), (0, 1, 0), (1, 0, 0), (1.0, 1.0), ((1, 1, 1), (0, 0, 0)), "checker", 0.5)
    o, d = np.array([[3.0, 0.2, 0.1]]), np.array([[-1.0, 0.0, 0.0]])
    t, normal, _ = tn._intersect(box, o, d)
    assert t[0] == pytest.approx(2.0)
    np.testing.assert_allclose(normal[0], [1.0, 0.0, 0.0])
    o, d = np.array([[0.1, 2.0, 0.1], [0.6, 2.0, 0.1], [3.0, 2.0, 0.0]]), np.array([[0.0, -1.0, 0.0]] * 3)
    t, normal, albedo = tn._intersect(tile, o, d)
    assert t[0] == pytest.approx(2.0) and math.isinf(t[2])
    np.testing.assert_allclose(normal[0], [0.0, 1.0, 0.0])
    assert not np.allclose(albedo[0], albedo[1])  # neighbouring checker squares


def test_rendered_views_are_in_range_deterministic_and_view_dependent():
    for scene in tn.SCENES.values():
        rays, img = tn.render_view(scene, 0.3, 0.5, 16)
        assert rays.shape == (256, 6) and img.shape == (256, 3)
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert (img.sum(1) == 0).any() and img.mean() > 0.05  # background and objects both in view
        np.testing.assert_allclose(np.linalg.norm(rays[:, 3:], axis=1), 1.0)
        np.testing.assert_array_equal(img, tn.render_view(scene, 0.3, 0.5, 16)[1])
    a = tn.view_poses(3, tn.QUICK)
    assert a == tn.view_poses(3, tn.QUICK) and a["test"] != tn.view_poses(4, tn.QUICK)["test"]
    assert not set(a["test"]) & set(a["train"])


def test_phong_highlight_depends_on_the_view():
    sphere = (tn.Sphere((0.0, 0.0, 0.0), 1.0, (0.5, 0.5, 0.5)),)
    p = tn.LIGHT_DIR  # the point of the sphere facing the light
    toward = -p[None]  # looking at it along the reflected direction: full highlight
    oblique = np.cross(p, [0.0, 0.0, 1.0])
    oblique = (0.6 * oblique / np.linalg.norm(oblique) - 0.8 * p)[None]
    c1 = tn.shade(sphere, p[None] * 3, toward)
    c2 = tn.shade(sphere, p[None] + 2.0 * -oblique, oblique)
    assert c1.sum() > c2.sum() + 0.3


def test_positional_encoding_shape_and_values():
    x = torch.tensor([[0.5, -1.0, 2.0]])
    enc = tn.positional_encoding(x, 6)
    assert enc.shape == (1, 3 + 3 * 2 * 6)
    torch.testing.assert_close(enc[0, :3], x[0])
    for k in range(6):
        torch.testing.assert_close(enc[0, 3 + 6 * k : 6 + 6 * k], torch.sin(2.0**k * x[0]))
        torch.testing.assert_close(enc[0, 6 + 6 * k : 9 + 6 * k], torch.cos(2.0**k * x[0]))
    assert tn.positional_encoding(torch.zeros(2, 5, 7, 3), 10).shape == (2, 5, 7, 63)


def _render_one_ray(rgb, sigma, depths):
    """The compositing written out sample by sample, front to back."""
    color, trans = [0.0, 0.0, 0.0], 1.0
    for i in range(len(depths)):
        nxt = depths[i + 1] if i + 1 < len(depths) else tn.FAR
        alpha = 1.0 - math.exp(-sigma[i] * (nxt - depths[i]))
        for c in range(3):
            color[c] += trans * alpha * rgb[i][c]
        trans *= 1.0 - alpha
    return color


def test_volume_rendering_matches_a_per_ray_loop():
    g = torch.Generator().manual_seed(0)
    depths = tn.sample_depths((2, 5), 9, jitter=True, device=torch.device("cpu")).double()
    assert bool((depths.diff(dim=-1) > 0).all()) and depths.min() >= tn.NEAR and depths.max() <= tn.FAR
    rgb = torch.rand(2, 5, 9, 3, generator=g, dtype=torch.float64)
    sigma = torch.rand(2, 5, 9, generator=g, dtype=torch.float64) * 4
    sigma[0, 0] = 0.0  # an empty ray renders black
    out, weights = tn.volume_render(rgb, sigma, depths)
    assert out.shape == (2, 5, 3) and weights.shape == (2, 5, 9)
    assert out[0, 0].abs().max() == 0 and bool((weights.sum(-1) <= 1 + 1e-9).all())
    for b in range(2):
        for r in range(5):
            ref = _render_one_ray(rgb[b, r].tolist(), sigma[b, r].tolist(), depths[b, r].tolist())
            torch.testing.assert_close(out[b, r], torch.tensor(ref, dtype=torch.float64), rtol=1e-8, atol=1e-8)


def test_tinynerf_eval_is_deterministic_and_layer1_is_63_wide_at_l10():
    torch.manual_seed(0)
    model = tn.TinyNeRF(num_samples=6).eval()
    rays = torch.tensor(tn.render_view(tn.SCENES["spheres"], 0.0, 0.4, 4)[0], dtype=torch.float32)[None]
    out = model(rays)
    assert out.shape == (1, 16, 3) and torch.equal(out, model(rays))
    assert tuple(tn.TinyNeRF(num_freqs=10).layer1.weight.shape) == (128, 63)  # the official code's layer1


def test_example_quick_runs_end_to_end(tmp_path):
    fig = tmp_path / "nerf.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "examples/tinynerf_ocd.py", "--quick", "--figure", str(fig)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in (
        "| base |",
        "| oracle, this layer (test label) |",
        "| OCD |",
        "| OCD x5 |",
        "| nearest-neighbour delta |",
    ):
        assert row in proc.stdout
    assert fig.stat().st_size > 1000


def test_per_view_weights_and_pooling_over_rays_and_samples():
    """layer1 sees [views, rays, samples, 39]: each view's delta reaches only its own rays, as W + Δ_b
    would, and the conditioning is the mean over rays and samples."""
    from ocd_hf.capture import capture_layer
    from ocd_hf.per_sample import per_sample_weights

    torch.manual_seed(0)
    model = tn.TinyNeRF(num_samples=5).eval().double()
    rays = torch.stack(
        [torch.tensor(tn.render_view(tn.SCENES["boxes"], a, 0.5, 3)[0]) for a in (0.0, 2.0)]
    )  # [2 views, 9 rays, 6]
    delta = torch.randn(2, *model.layer1.weight.shape, dtype=torch.float64) * 0.1
    with torch.no_grad(), per_sample_weights(model.layer1, delta), capture_layer(model.layer1) as cap:
        batched = model(rays)
    w = model.layer1.weight.detach().clone()
    for b in range(2):
        with torch.no_grad():
            model.layer1.weight.copy_(w + delta[b])
            torch.testing.assert_close(batched[b], model(rays[b : b + 1])[0])
            model.layer1.weight.copy_(w)
    o, d = rays[..., :3], rays[..., 3:]
    depths = tn.sample_depths(o.shape[:-1], 5, False, torch.device("cpu")).double()
    enc = tn.positional_encoding(o[..., None, :] + depths[..., None] * d[..., None, :])
    torch.testing.assert_close(cap.layer_input, enc.mean(dim=(1, 2)))


def _slow_weighted_pool(model, rays):
    """Per view, per ray, per sample: the eval forward written out, its volume weights normalised over the
    view, and the weighted sums of the encoding and of layer1's post-ReLU output."""
    s = model.num_samples
    depths = tn.sample_depths((), s, False, torch.device("cpu")).tolist()  # the forward's float32 midpoints
    i_rows, a_rows = [], []
    for view in rays:
        terms = []
        for ray in view:
            o, d = ray[:3], ray[3:]
            trans = 1.0
            for k, t in enumerate(depths):
                enc = tn.positional_encoding((o + t * d)[None])[0]
                h = torch.relu(model.layer1(enc))
                sigma = torch.relu(model.layer3(torch.relu(model.layer2(h)))[3]).item()
                nxt = depths[k + 1] if k + 1 < s else tn.FAR
                alpha = 1.0 - math.exp(-sigma * (nxt - t))
                terms.append((trans * alpha, enc, h))
                trans *= 1.0 - alpha + 1e-10
        total = sum(w for w, _, _ in terms)
        i_rows.append(sum(w * e for w, e, _ in terms) / total)
        a_rows.append(sum(w * h for w, _, h in terms) / total)
    return torch.stack(i_rows), torch.stack(a_rows)


def test_nerf_conditioner_pools_with_the_volume_weights_as_a_per_view_loop():
    from ocd_hf import OCDWrapper

    torch.manual_seed(0)
    model = tn.TinyNeRF(num_samples=5).eval().double()
    with torch.no_grad():
        model.layer3.bias[3] = 1.0  # dense enough that the weights differ from the mean
    rays = torch.stack([torch.tensor(tn.render_view(tn.SCENES["boxes"], a, 0.5, 3)[0]) for a in (0.0, 2.0)])
    conditioner = tn.NeRFConditioner(model, image_size=3)  # no encoder: f is the mean colour
    ocd = OCDWrapper.from_pretrained(model, layer="layer1", conditioner=conditioner)
    cond, out = ocd.conditioning(rays)
    with torch.no_grad():
        i_ref, a_ref = _slow_weighted_pool(model, rays)
    torch.testing.assert_close(cond.layer_input, i_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cond.layer_output, a_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(cond.model_output, out.mean(1))
    mean = OCDWrapper.from_pretrained(model, layer="layer1").conditioning(rays)[0]
    assert not torch.allclose(cond.layer_input, mean.layer_input, atol=1e-3)  # the weights matter here
    assert conditioner.name == "nerf-volume-weights+mean-colour"
    # a view that renders nothing pools to zeros instead of dividing by zero
    torch.testing.assert_close(tn.weighted_pool(torch.zeros(1, 2, 3), torch.ones(1, 2, 3, 4)), torch.zeros(1, 4))


def test_encoder_missing_is_said_and_f_encodes_each_rendering(tmp_path):
    encoder, why = tn.find_encoder(tmp_path)
    assert encoder is None and str(tmp_path / tn.ENCODER_FILE) in why and "falls back" in why
    path = tn.DEFAULT_DATA / tn.ENCODER_FILE
    if not path.exists():
        path = Path("/work/shared/data") / tn.ENCODER_FILE
    if not path.exists():
        pytest.skip(f"no EfficientNet-Lite0 weights at {path} (../shared/data/models)")
    encoder, why = tn.find_encoder(path.parents[1])
    assert "EfficientNet-Lite0" in why
    torch.manual_seed(0)
    model = tn.TinyNeRF(num_samples=4).eval()
    conditioner = tn.NeRFConditioner(model, image_size=4, encoder=encoder, encode_size=32)
    assert conditioner.name == "nerf-volume-weights+efficientnet-lite0"
    images = torch.rand(2, 16, 3)
    f = conditioner.encode(images)
    assert f.shape == (2, 1000)
    for b in range(2):  # one view at a time, the image laid out row by row as the camera's rays are
        img = images[b].reshape(4, 4, 3).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(img, size=32, mode="bilinear", align_corners=False)
        with torch.no_grad():
            want = encoder((x * 255 - 127) / 128)  # ImageNet logits
        torch.testing.assert_close(f[b : b + 1], want, rtol=1e-4, atol=1e-5)


def test_a_base_model_that_renders_nothing_is_retrained(monkeypatch):
    """A TinyNeRF whose density ReLU closed everywhere renders black and gives OCD only zero deltas ("Every
    collected sample has a zero delta"): seed 2's planes did. `train_live_base` retrains it from a new seed."""
    torch.manual_seed(0)
    rays = torch.tensor(tn.render_view(tn.SCENES["planes"], 0.3, 0.5, 4)[0], dtype=torch.float32)[None]
    alive = tn.TinyNeRF(num_samples=4).eval()
    dead = tn.TinyNeRF(num_samples=4).eval()
    with torch.no_grad():
        dead.layer3.bias[3] = -1e3  # σ = relu(raw) = 0 on every sample
    assert tn.renders_nothing(dead, rays) and not tn.renders_nothing(alive, rays)
    from conftest import TINY_HEAD

    from ocd_hf import OCDWrapper

    ocd = OCDWrapper.from_pretrained(dead, layer="layer1", loss="mse", task="regression", **TINY_HEAD)
    views = torch.utils.data.TensorDataset(rays.repeat(2, 1, 1), torch.rand(2, 16, 3))
    with pytest.raises(ValueError, match="zero delta.*ReLU closed for every input"):
        ocd.fit(views, num_train_steps=2, progress=False)
    seeds = []

    def fake_train(dataset, sizes, seed):
        seeds.append(seed)
        return dead if len(seeds) < 3 else alive

    monkeypatch.setattr(tn, "train_base", fake_train)
    data = torch.utils.data.TensorDataset(rays, torch.zeros(1, 16, 3))
    model, restarts = tn.train_live_base(data, tn.QUICK, 5)
    assert model is alive and restarts == 2 and seeds == [5, 1005, 2005]
    monkeypatch.setattr(tn, "train_base", lambda dataset, sizes, seed: dead)
    with pytest.raises(RuntimeError, match="collapsed"):
        tn.train_live_base(data, tn.QUICK, 5)


def test_scene_results_are_saved_and_reused(tmp_path, monkeypatch):
    first = tn.run_seed(0, quick=True, conditioning="mean", scenes=["planes"], scene_dir=tmp_path)
    saved = tn.scene_path(tmp_path, 0, "planes", True, "mean")
    assert (
        saved.exists() and first["sizes"]["scenes"] == ["planes"] and first["per_group"]["planes"]["base_restarts"] == 0
    )

    def no_refit(*args, **kwargs):
        raise AssertionError("a saved scene was fitted again")

    monkeypatch.setattr(tn, "fit_scene", no_refit)
    again = tn.run_seed(0, quick=True, conditioning="mean", scenes=["planes"], scene_dir=tmp_path)
    assert again["rows"] == first["rows"] and again["cpu_s"] == first["cpu_s"]


def test_table_pairs_ocd_with_every_row_and_states_the_gap_share():
    def record(seed, base, ocd, nn):
        rows = {"base": base, "oracle, this layer (test label)": base - 0.01, "OCD": ocd, "OCD x5": ocd}
        rows["nearest-neighbour delta"] = nn
        rows = {k: {"mse": v, "psnr": tn.psnr(v)} for k, v in rows.items()}
        cal = {"delta_scale": 1.0, "gain_vs_base": 0.001, "gain_se": 0.0005, "min_gain_se": 1.0}
        return {
            "seed": seed,
            "rows": rows,
            "per_group": {"planes": {"rows": rows, "delta_scale": 1.0, "calibration": cal}},
            "wall_s": 1.0,
            "cpu_s": 1.0,
            "conditioning": {"name": "nerf", "f": "EfficientNet-Lite0 logits, from /somewhere/models/enc.pth"},
        }

    md = tn.to_markdown([record(0, 0.02, 0.015, 0.016), record(1, 0.03, 0.025, 0.0249)], "cmd")
    assert "OCD is better than base: ΔMSE = -0.0050 ± 0.0000 (SD over 2 seeds; lower in 2/2)" in md
    assert "OCD is no different (within noise) from nearest-neighbour delta" in md and "lower in 1/2" in md
    assert "OCD is better than OCD x5" not in md and "from oracle" not in md  # ensembles and the oracle are not rivals
    assert "gap that OCD closes: 50% ± 0% (per seed" in md
    assert (
        "(the best grid value kept only when its validation gain was ≥ 1 standard errors)." in md
        and "/somewhere" not in md
        and "`enc.pth` under `--data-root`" in md
    )
    assert "Per scene (PSNR in dB" in md
