import resource

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN
from torch import nn
from torch.utils.data import TensorDataset
from transformers.pytorch_utils import Conv1D

from ocd_hf import OCDWrapper
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_batch
from ocd_hf.per_sample import factored_to_full, input_direction, per_sample_weights


def mlp(d_in=6, hidden=12, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes)
    )


def test_sgd_factored_equals_full_delta_exactly():
    m = mlp()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    m = m.double()
    full = overfit_batch(m, m[2], x, y, cross_entropy, steps=3, lr=0.5, optimizer="sgd", target="full")
    fac = overfit_batch(m, m[2], x, y, cross_entropy, steps=3, lr=0.5, optimizer="sgd", target="factored")
    assert fac.delta.shape == (10, 12)
    v = fac.layer_input / fac.layer_input.norm(dim=1, keepdim=True)
    rebuilt = factored_to_full(m[2], fac.delta, v)
    rel = (rebuilt - full.delta).norm() / full.delta.norm()
    assert rel <= 1e-6
    torch.testing.assert_close(fac.energy, torch.ones(10, dtype=fac.energy.dtype))


def test_adam_factored_is_projection_with_energy():
    """method="full" (token inputs) projects full Adam; rank-one Adam's match to it is in test_memory.py."""
    m = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    full = overfit_batch(m, m[2], x, y, cross_entropy, target="full")
    fac = overfit_batch(m, m[2], x, y, cross_entropy, target="factored", method="full")
    v = full.layer_input / full.layer_input.norm(dim=1, keepdim=True)
    u = torch.einsum("boi,bi->bo", full.delta, v)
    torch.testing.assert_close(fac.delta, u)
    energy = u.pow(2).sum(1) / full.delta.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(fac.energy, energy)
    assert ((fac.energy > 0) & (fac.energy <= 1 + 1e-6)).all()


@pytest.mark.parametrize(
    "layer,shape", [(nn.Linear(7, 5), (4, 7)), (nn.Linear(7, 5), (4, 3, 7)), (Conv1D(5, 7), (4, 6, 7))]
)
def test_factored_forward_equals_full_forward(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    u = torch.randn(4, 5)
    v = input_direction(x)
    with per_sample_weights(layer, u, input_factor="auto"):
        fac = layer(x)
    with per_sample_weights(layer, factored_to_full(layer, u, v)):
        full = layer(x)
    torch.testing.assert_close(fac, full, atol=1e-5, rtol=1e-5)


def test_factored_refuses_conv():
    conv = nn.Conv2d(1, 2, 3)
    m = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 36, 3))
    with pytest.raises(TypeError, match="target='factored' supports Linear"):
        overfit_batch(m, conv, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), cross_entropy, target="factored")


def test_token_inputs_sgd_energy_not_measured():
    lin = nn.Linear(4, 3)
    m = nn.Sequential(lin)

    def fwd(model, x):
        return model(x).mean(1)

    r = overfit_batch(
        m,
        lin,
        torch.randn(2, 5, 4),
        torch.tensor([0, 2]),
        cross_entropy,
        fwd,
        optimizer="sgd",
        lr=0.1,
        target="factored",
    )
    assert r.delta.shape == (2, 3) and torch.isnan(r.energy).all()


def test_wrapper_factored_end_to_end(small_cnn, image_data):
    ocd = OCDWrapper.from_pretrained(small_cnn, layer="fc1", target="factored", **TINY_HEAD)
    ocd.fit(image_data, loss="cross_entropy", num_train_steps=5, **TINY_TRAIN)
    assert ocd.shapes.target_shape == (24, 1)
    x = image_data.tensors[0][:4]
    cond, _ = ocd.conditioning(x)
    u = ocd.generate_deltas(cond, 2, torch.Generator().manual_seed(0))
    assert u.shape == (2, 4, 24)
    out = ocd(x, generator=torch.Generator().manual_seed(0))
    v = cond.layer_input / cond.layer_input.norm(dim=1, keepdim=True)
    ref = ocd.forward_with_deltas(x, factored_to_full(small_cnn.fc1, u[0], v))
    ref_fac = ocd.forward_with_deltas(x, u[0])
    torch.testing.assert_close(out, ref_fac)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_4096_square_layer_collect_train_generate(tmp_path):
    """Factored SGD never builds the [B, 4096, 4096] delta (that alone would be 64 MiB per sample)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4))
    data = TensorDataset(torch.randn(32, 16), torch.randint(0, 4, (32,)))
    ocd = OCDWrapper.from_pretrained(
        m,
        layer="2",
        target="factored",
        overfit_optimizer="sgd",
        overfit_lr=0.01,
        **TINY_HEAD,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ocd.fit(
        data,
        loss="cross_entropy",
        batch_size=16,
        collect_dir=tmp_path / "c",
        num_train_steps=3,
        train_batch_size=8,
        progress=False,
    )
    out = ocd(data.tensors[0][:2], generator=torch.Generator().manual_seed(0))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    assert ocd.shapes.target_shape == (4096, 1)
    # the full deltas of one batch would need 16 * 4096 * 4096 * 4 B = 1 GiB
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"
    from ocd_hf.collection import DeltaStore

    assert DeltaStore(tmp_path / "c").get_batch([0, 31])["delta"].shape == (2, 4096)
