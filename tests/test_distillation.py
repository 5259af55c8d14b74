"""The distilled one-pass sampler end to end, and the sampling loop's condition cache."""

import json
import warnings

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, SmallCNN, shapes_for
from torch.utils.data import TensorDataset

from ocd_hf import OCDWrapper
from ocd_hf.capture import Conditioning
from ocd_hf.config import OCDConfig
from ocd_hf.denoiser import ConditionalUNet1D
from ocd_hf.sampling import make_sampling_scheduler, sample_omega

# tiny heads trained for a few steps sample too narrow; that warning is not what these tests check
pytestmark = pytest.mark.filterwarnings("ignore:Sampled deltas:RuntimeWarning")
DISTILL = dict(num_steps=4, batch_size=8, num_draws=2, progress=False)


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


def _fit(target="full", **config):
    torch.manual_seed(0)
    model = SmallCNN()
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", target=target, **TINY_HEAD, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # uncalibrated
        ocd.fit(_data(), loss="cross_entropy", batch_size=16, num_train_steps=6, **TINY_TRAIN)
    return ocd, model


@pytest.fixture(scope="module")
def distilled():
    ocd, model = _fit()
    x = _data(6, seed=2).tensors[0]
    teacher = ocd(x, generator=torch.Generator().manual_seed(3))
    record = ocd.distill(_data(), **DISTILL)
    return ocd, model, x, teacher, record


def _denoiser_calls(ocd):
    """Batch sizes of every call of the head's denoisers (teacher and student) while the hooks are on."""
    calls = []
    nets = [ocd.head.denoiser] + ([ocd.head.student] if ocd.head.student is not None else [])
    handles = [n.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0])) for n in nets]
    return calls, handles


def test_distill_switches_sampler_and_records_the_run(distilled):
    ocd, _, x, teacher, record = distilled
    assert ocd.config.sampler == "distilled" and ocd.state.distillation == record
    assert record["method"] == "direct" and record["teacher_steps"] == 10 and record["guidance_scale"] == 1.0
    assert record["heldout_mse_before"] >= 0 and record["heldout_mse_after"] >= 0
    out = ocd(x, generator=torch.Generator().manual_seed(3))
    assert out.shape == teacher.shape and not torch.equal(out, teacher)
    # the default student is a trained copy: the teacher's weights are untouched
    assert record["student_channels"] is None
    s, t = ocd.head.student.state_dict(), ocd.head.denoiser.state_dict()
    assert s.keys() == t.keys() and any(not torch.equal(s[k], t[k]) for k in s)
    ocd.config = ocd.config.replace(sampler="ddim")
    try:  # the teacher still samples exactly as before distillation
        assert torch.equal(ocd(x, generator=torch.Generator().manual_seed(3)), teacher)
    finally:
        ocd.config = ocd.config.replace(sampler="distilled")
    assert "distilled one-pass sampler" in repr(ocd)


def test_one_denoiser_pass_per_draw(distilled):
    ocd, _, x, _, _ = distilled
    calls, handles = _denoiser_calls(ocd)
    try:
        ocd(x, num_samples=3, generator=torch.Generator().manual_seed(0))
        assert calls == [3 * len(x)]  # one student call for all draws, nothing from the teacher
        calls.clear()
        ocd.config = ocd.config.replace(sampler="ddim")
        ocd(x, num_samples=3, generator=torch.Generator().manual_seed(0))
        assert calls == [3 * len(x)] * 10
    finally:
        ocd.config = ocd.config.replace(sampler="distilled")
        for h in handles:
            h.remove()


def test_save_load_identical_outputs(distilled, tmp_path):
    ocd, model, x, _, record = distilled
    ocd.save_pretrained(tmp_path / "head")
    assert json.loads((tmp_path / "head" / "ocd_config.json").read_text())["sampler"] == "distilled"
    state = json.loads((tmp_path / "head" / "ocd_state.json").read_text())
    assert state["fitted"]["distillation"] == record
    loaded = OCDWrapper.from_pretrained(model, tmp_path / "head")
    assert loaded.config.sampler == "distilled" and loaded.head.student is not None
    for kw in ({}, {"num_samples": 3}, {"num_samples": 3, "ensemble": "mean_weights"}):
        a = ocd(x, generator=torch.Generator().manual_seed(5), **kw)
        b = loaded(x, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(a, b), kw
    # and the teacher of the loaded head too
    loaded.config = loaded.config.replace(sampler="ddim")
    ocd.config = ocd.config.replace(sampler="ddim")
    try:
        assert torch.equal(
            ocd(x, generator=torch.Generator().manual_seed(5)), loaded(x, generator=torch.Generator().manual_seed(5))
        )
    finally:
        ocd.config = ocd.config.replace(sampler="distilled")


def test_student_sizes_round_trip_bit_for_bit(tmp_path):
    """Students narrower than the teacher save and load to the same tensors and outputs."""
    ocd, model = _fit()
    assert ocd.head.config.block_out_channels == (16, 16, 32)
    x = _data(5, seed=4).tensors[0]
    for choice, expected in (("half", [8, 8, 16]), ((8, 16), [8, 16])):
        record = ocd.distill(_data(), student_channels=choice, **DISTILL)
        assert record["student_channels"] == expected
        folder = tmp_path / str(expected)
        ocd.save_pretrained(folder)
        loaded = OCDWrapper.from_pretrained(model, folder)
        assert list(loaded.head.student.unet.config.block_out_channels) == expected
        a, b = ocd.head.student.state_dict(), loaded.head.student.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
        assert torch.equal(ocd(x, num_samples=2, generator=g()), loaded(x, num_samples=2, generator=g()))


def test_format_3_distilled_head_still_loads(tmp_path):
    """Heads distilled before students had their own size (format 3, no student_channels) load as before."""
    ocd, model = _fit()
    ocd.distill(_data(), **DISTILL)
    ocd.save_pretrained(tmp_path / "h")
    state_path = tmp_path / "h" / "ocd_state.json"
    state = json.loads(state_path.read_text())
    state["format_version"] = 3
    del state["fitted"]["distillation"]["student_channels"]
    state_path.write_text(json.dumps(state))
    loaded = OCDWrapper.from_pretrained(model, tmp_path / "h")
    x = _data(3, seed=5).tensors[0]
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(ocd(x, generator=g()), loaded(x, generator=g()))


@pytest.mark.parametrize("bad", [(12, 16), (), "small", (8, 0)])
def test_bad_student_channels_name_the_fix(bad):
    ocd, _ = _fit()
    with pytest.raises(ValueError, match="student_channels=.*multiple of norm_num_groups=8"):
        ocd.distill(_data(), student_channels=bad, **DISTILL)
    assert ocd.head.student is None and ocd.config.sampler == "ddim"  # nothing changed


def test_undistilled_head_saves_without_student(tmp_path):
    ocd, model = _fit()
    ocd.save_pretrained(tmp_path / "h")
    from safetensors.torch import load_file

    assert not any(k.startswith("student.") for k in load_file(str(tmp_path / "h" / "ocd_head.safetensors")))
    loaded = OCDWrapper.from_pretrained(model, tmp_path / "h")
    assert loaded.head.student is None and loaded.config.sampler == "ddim"
    with pytest.raises(RuntimeError, match="no distilled student"):
        loaded.config = loaded.config.replace(sampler="distilled")
        loaded(_data(2).tensors[0])


def test_distilled_head_accepts_what_a_ddim_head_accepts():
    """Factored targets, ensembles and guidance: same behaviour, or a clear error naming the fix."""
    ocd, _ = _fit(target="factored", cond_dropout=0.2, guidance_scale=2.0)
    x = _data(4, seed=3).tensors[0]
    ocd.distill(_data(), **DISTILL)  # the student imitates the guided teacher
    assert ocd.head.student_guidance == 2.0
    for kw in (
        {},
        {"num_samples": 2},
        {"num_samples": 2, "ensemble": "outputs"},
        {"num_samples": 2, "ensemble": "mean_weights"},
    ):
        assert ocd(x, generator=torch.Generator().manual_seed(0), **kw).shape == (4, 5)
    cond, _ = ocd.conditioning(x)
    assert ocd.generate_deltas(cond, 2, torch.Generator().manual_seed(0)).shape == (2, 4, 24)  # u of Δ = u v̂ᵀ
    ocd.config = ocd.config.replace(guidance_scale=1.0)
    with pytest.raises(ValueError, match="guidance_scale=2.*Distill again"):
        ocd(x)
    ocd.config = ocd.config.replace(sampler="ddim")
    assert ocd(x).shape == (4, 5)
    with pytest.raises(ValueError, match="DeltaStore"):
        ocd.distill(None)


def test_distill_from_a_collection_equals_distill_from_the_dataset(tmp_path):
    ocd, _ = _fit()
    store = ocd.collect(_data(), loss="cross_entropy", collect_dir=str(tmp_path / "c"), progress=False)
    a = ocd.distill(store, **DISTILL)
    sa = {k: v.clone() for k, v in ocd.head.student.state_dict().items()}
    b = ocd.distill(_data(), **DISTILL)
    assert a == b
    for k, v in ocd.head.student.state_dict().items():
        torch.testing.assert_close(v, sa[k], atol=1e-5, rtol=1e-5)  # I(x) from disk vs recomputed


def test_refit_drops_the_student(distilled):
    ocd, _ = _fit()
    ocd.distill(_data(), **DISTILL)
    ocd.train_head(ocd.collect(_data(), loss="cross_entropy", progress=False), num_train_steps=2, **TINY_TRAIN)
    assert ocd.config.sampler == "ddim" and ocd.state.distillation is None and ocd.head.student is None


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_condition_cache_is_exact(guidance):
    """The embedding computed once per call gives bit-identical samples: the same ops on the same tensors."""
    torch.manual_seed(0)
    shape = (6, 4)
    config = OCDConfig(layer="x", **TINY_HEAD, cond_dropout=0.1)
    d = ConditionalUNet1D(config, shapes_for(shape))
    g = torch.Generator().manual_seed(1)
    c = Conditioning(torch.randn(3, 5, generator=g), torch.randn(3, 6, generator=g), torch.randn(3, 3, generator=g))
    encodes = []
    d.enc_input.register_forward_hook(lambda *a: encodes.append(1))
    cached = sample_omega(d, c, make_sampling_scheduler(config), 10, 2, torch.Generator().manual_seed(2), guidance)
    assert len(encodes) == 1
    # the uncached reference: the same loop by hand, encoders run every step
    s = make_sampling_scheduler(config)
    s.set_timesteps(10)
    x = torch.randn((6, *shape), generator=torch.Generator().manual_seed(2))
    rep = Conditioning(*(t.repeat(2, 1) for t in c))
    both = Conditioning(*(torch.cat([t, torch.zeros_like(t)]) for t in rep))
    with torch.no_grad():
        d.eval()
        for t in s.timesteps:
            if guidance != 1.0:
                pc, pu = d(torch.cat([x, x]), t, both).chunk(2)
                pred = pu + guidance * (pc - pu)
            else:
                pred = d(x, t, rep)
            x = s.step(pred, t, x, eta=0.0).prev_sample
    assert len(encodes) == 11
    assert torch.equal(cached, x.reshape(2, 3, *shape))
    assert not cached.is_inference()  # usable in autograd by the caller


def test_sampling_steps_benchmark_quick():
    """`python -m benchmarks.sampling_steps --quick` runs and prints every sampler row and every engineering change."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sampling_steps", "--quick"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in ("| base | 0 |", "| DDIM 1 | 1 |", "| DDIM 3 | 3 |", "| DDIM 10 | 10 |", "| distilled | 1 |"):
        assert row in out, row
    for change in ("inference_mode", "condition embedding once", "DDIMScheduler.step", "one denoiser batch"):
        assert change in out, change


def test_fast_mish_matches_torch_mish():
    """The denoiser's Mish outside autograd: torch's values to float rounding, incl. extremes, NaN and inf."""
    from ocd_hf.denoiser import FastMish

    x = torch.cat([torch.linspace(-60, 60, 10001), torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf")])])
    assert x.numel() >= FastMish.MIN_NUMEL
    with torch.no_grad():
        torch.testing.assert_close(FastMish()(x.clone()), torch.nn.functional.mish(x), atol=1e-6, rtol=1e-6)
        nan = FastMish()(torch.tensor([float("nan"), float("-inf")]).repeat(FastMish.MIN_NUMEL))
        assert torch.isnan(nan).all()  # as torch's: mish(-inf) = -inf·0
    y = x[:10001].clone().requires_grad_()
    assert torch.equal(FastMish()(y), torch.nn.functional.mish(y))  # with autograd: torch's own kernel
    d = ConditionalUNet1D(OCDConfig(layer="x", **TINY_HEAD), shapes_for((6, 4)))
    assert not any(type(m) is torch.nn.Mish for m in d.modules())


@pytest.mark.parametrize(
    ("steps", "prediction_type", "shortcut"),
    [(1, "sample", True), (10, "sample", True), (7, "sample", False), (1, "epsilon", False)],
)
def test_last_step_shortcut_is_exact(steps, prediction_type, shortcut):
    """The last DDIM step returns the x0 prediction itself only where the scheduler's update is exactly that."""
    from ocd_hf.sampling import returns_prediction

    torch.manual_seed(0)
    config = OCDConfig(layer="x", **TINY_HEAD, prediction_type=prediction_type)
    s = make_sampling_scheduler(config)
    s.set_timesteps(steps)
    assert returns_prediction(s) is shortcut
    d = ConditionalUNet1D(config, shapes_for((6, 4))).eval()
    g = torch.Generator().manual_seed(1)
    c = Conditioning(torch.randn(3, 5, generator=g), torch.randn(3, 6, generator=g), torch.randn(3, 3, generator=g))
    out = sample_omega(d, c, make_sampling_scheduler(config), steps, 1, torch.Generator().manual_seed(2))
    x = torch.randn((3, 6, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(d(x, t, c), t, x, eta=0.0).prev_sample
    assert torch.equal(out[0], x)


def test_all_finite_matches_isfinite():
    from ocd_hf.health import all_finite

    g = torch.Generator().manual_seed(0)
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        for shape in ((5,), (3, 4, 7), (0, 3)):
            t = torch.randn(shape, generator=g)
            if bad is not None and t.numel():
                t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = bad
            assert all_finite(t) == bool(torch.isfinite(t).all()), (bad, shape)
