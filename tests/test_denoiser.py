import math

import pytest
import torch
from conftest import TINY_HEAD, shapes_for

from ocd_hf.capture import Conditioning
from ocd_hf.config import OCDConfig
from ocd_hf.denoiser import ConditionalUNet1D
from ocd_hf.sampling import make_sampling_scheduler, make_train_scheduler, sample_omega, training_target
from ocd_hf.scale import ScaleNet, scale_loss


def cfg(shape, **kw):
    return OCDConfig(layer="x", **{**TINY_HEAD, **kw})


def cond(b, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        torch.randn(b, 5, generator=g), torch.randn(b, shape[0], generator=g), torch.randn(b, 3, generator=g)
    )


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("shape", [(10, 84), (84, 120), (7, 3), (6, 2, 3, 3)])
def test_shapes_and_layout_round_trip(layout, shape):
    torch.manual_seed(0)
    d = ConditionalUNet1D(cfg(shape, layout=layout), shapes_for(shape))
    x = torch.randn(3, *shape)
    seq = d.to_sequence(x)
    assert seq.shape[-1] % 4 == 0
    torch.testing.assert_close(d.from_sequence(seq), x)
    out = d(x, torch.tensor([1, 500, 999]), cond(3, shape))
    assert out.shape == (3, *shape)


def test_conditioning_changes_prediction_and_is_required():
    torch.manual_seed(0)
    shape = (8, 6)
    d = ConditionalUNet1D(cfg(shape), shapes_for(shape)).eval()
    x = torch.randn(2, *shape)
    a = d(x, 10, cond(2, shape, 0))
    b = d(x, 10, cond(2, shape, 1))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(d(x, 10, cond(2, shape, 0)), a)
    with pytest.raises(RuntimeError, match="conditioning missing"):
        d.unet(d.to_sequence(x), 10)


class ConstantX0(ConditionalUNet1D):
    """A denoiser that always predicts the same clean sample: DDIM must land exactly on it."""

    def forward(self, omega_t, t, c):
        return self.target.expand_as(omega_t)


def test_ddim_lands_on_predicted_clean_sample():
    shape = (4, 6)
    d = ConstantX0(cfg(shape, prediction_type="sample"), shapes_for(shape))
    d.target = torch.randn(1, *shape)
    s = make_sampling_scheduler(d_config := cfg(shape, prediction_type="sample"))
    assert s.config.clip_sample is False and d_config.num_inference_steps == 10
    d.train()
    out = sample_omega(d, cond(3, shape), s, 10, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, *shape)
    torch.testing.assert_close(out, d.target.expand(2, 3, *shape), atol=1e-4, rtol=1e-4)
    assert d.training  # mode restored


def test_sampling_is_seeded():
    torch.manual_seed(0)
    shape = (5, 4)
    d = ConditionalUNet1D(cfg(shape), shapes_for(shape))
    s = make_sampling_scheduler(cfg(shape))
    a = sample_omega(d, cond(2, shape), s, 10, 3, torch.Generator().manual_seed(7))
    b = sample_omega(d, cond(2, shape), s, 10, 3, torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)
    assert (a[0] - a[1]).abs().max() > 1e-3  # draws differ


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_training_targets(kind):
    s = make_train_scheduler(cfg((3, 3), prediction_type=kind))
    assert s.config.clip_sample is False
    clean, noise, t = torch.randn(4, 3, 3), torch.randn(4, 3, 3), torch.tensor([0, 10, 500, 999])
    target = training_target(s, clean, noise, t)
    expected = {"epsilon": noise, "sample": clean}.get(kind)
    if expected is None:
        a = s.alphas_cumprod[t].view(-1, 1, 1)
        expected = a.sqrt() * noise - (1 - a).sqrt() * clean
    torch.testing.assert_close(target, expected)


def test_scale_net_and_loss():
    shape = (6, 4)
    net = ScaleNet(cfg(shape), shapes_for(shape))
    net.init_log_scale(-3.0)
    c = cond(5, shape)
    rho = net(c)
    assert rho.shape == (5,) and (rho > 0).all()
    t = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(scale_loss(t, t), torch.tensor(-80.0))  # 10·log10(1e-8)
    assert scale_loss(torch.tensor([2.0]), torch.tensor([1.0])).item() == pytest.approx(
        10 * math.log10(1 + 1e-8), abs=1e-6
    )
