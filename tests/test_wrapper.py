import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN
from torch.utils.data import TensorDataset

from ocd_hf import OCDWrapper


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from conftest import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 5, (48,), generator=g))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", **TINY_HEAD)
    ocd.fit(data, loss="cross_entropy", batch_size=16, num_train_steps=15, **TINY_TRAIN)
    return ocd, model, data, before


def test_fit_sets_config_and_leaves_model_untouched(fitted):
    ocd, model, data, before = fitted
    c, s = ocd.config, ocd.shapes
    assert s.weight_shape == (24, 64) and s.input_dim == 64 and s.activation_dim == 24 and s.output_dim == 5
    assert c.task == "classification" and c.loss == "cross_entropy" and len(ocd.provenance.layer_fingerprint) == 64
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert not any(m._forward_hooks for m in model.modules())
    assert ocd.unload() is model


def test_forward_per_sample_and_ensembles(fitted):
    ocd, model, data, _ = fitted
    x = data.tensors[0][:6]
    model.train()
    out = ocd(x, generator=torch.Generator().manual_seed(0))
    assert model.training  # mode restored
    assert out.shape == (6, 5)
    torch.testing.assert_close(ocd(x, generator=torch.Generator().manual_seed(0)), out)
    # the generated deltas are what the output used
    cond, _ = ocd.conditioning(x)
    d = ocd.generate_deltas(cond, 1, torch.Generator().manual_seed(0))[0]
    manual = torch.stack(
        [
            torch.nn.functional.linear(x[i : i + 1], None, None)
            if False
            else _manual_forward(model, x[i : i + 1], d[i])
            for i in range(6)
        ]
    ).squeeze(1)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    logp = ocd(x, num_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(6), atol=1e-5, rtol=0)
    mw = ocd(x, num_samples=4, ensemble="mean_weights", generator=torch.Generator().manual_seed(0))
    assert mw.shape == (6, 5)
    with pytest.raises(ValueError, match="ensemble"):
        ocd(x, ensemble="vote")


def _manual_forward(model, x, delta):
    import copy

    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        m.fc1.weight += delta
        return m(x)


def test_errors(small_cnn, image_data):
    with pytest.raises(ValueError, match=r"No layer named 'fc9'.*Candidate layers: \['conv', 'fc1', 'fc2'\]"):
        OCDWrapper.from_pretrained(small_cnn, layer="fc9")
    with pytest.raises(TypeError, match="BatchNorm2d"):
        OCDWrapper.from_pretrained(small_cnn, layer="bn")
    ocd = OCDWrapper.from_pretrained(small_cnn, layer="fc2")
    with pytest.raises(RuntimeError, match="no trained head"):
        ocd(torch.randn(2, 1, 8, 8))
    bad = TensorDataset(image_data.tensors[0][:8], torch.randn(8, 3))
    with pytest.raises(ValueError, match="integer class labels"):
        ocd.fit(bad, loss="cross_entropy", progress=False)
    with pytest.raises(ValueError, match="loss="):
        ocd.fit(image_data, progress=False)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        OCDWrapper.from_pretrained(object(), layer="x")


def test_nan_head_stops(fitted):
    ocd, _, data, _ = fitted
    import copy

    broken = copy.deepcopy(ocd)
    with torch.no_grad():
        broken.head.scale_net.net[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite deltas"):
        broken(data.tensors[0][:2])


def test_sampling_health_warning_points_at_the_callers_line(fitted):
    ocd, _, data, _ = fitted
    saved, ocd.state.target_std = ocd.state.target_std, 1e3  # far from any sampled spread: the warning fires
    try:
        with pytest.warns(RuntimeWarning, match="leave the training range") as rec:
            ocd(data.tensors[0][:2])
    finally:
        ocd.state.target_std = saved
    assert {r.filename for r in rec} == {__file__}  # not torch's decorator or an ocd_hf module
