"""The conditioner extension point (ocd_hf.conditioner): the default is today's mean pooling bit for bit, a
custom conditioner makes every I(x) (collected columns and inference), is saved by name, and a head is
refused without the conditioner it was trained on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN
from torch import nn
from torch.utils.data import TensorDataset

from ocd_hf import Conditioner, Conditioning, MeanPool, OCDWrapper
from ocd_hf.capture import capture_layer, pool
from ocd_hf.constants import STATE_NAME
from ocd_hf.modes import eval_mode

pytestmark = pytest.mark.filterwarnings("ignore:Sampled deltas have std:RuntimeWarning")  # 4-step heads


class TokenNet(nn.Module):
    """[B, T, 4] (or [B, 4]) -> [B, T, 3]: two Linears, so fc1 sees tokens (or one vector per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class OutputWeighted(Conditioner):
    """Pools i_L and relu(a_L) over tokens with softmax weights read off the model output, and encodes the
    output as [mean, max] (6 wide): everything the default would not do."""

    name = "output-weighted"

    def __call__(self, layer_input, layer_output, model_output, channels_first=False):
        tokens = lambda t: t if t.dim() == 3 else t[:, None]  # noqa: E731
        w = torch.softmax(tokens(model_output).sum(-1), dim=1)[..., None]  # [B, T, 1]
        f = torch.cat([tokens(model_output).mean(1), tokens(model_output).amax(1)], 1)
        return Conditioning((w * tokens(layer_input)).sum(1), (w * tokens(layer_output).relu()).sum(1), f)


def _data(tokens: bool, n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, 4, generator=g) if tokens else torch.randn(n, 4, generator=g)
    y = torch.randn(n, 5, 3, generator=g) if tokens else torch.randn(n, 3, generator=g)
    return TensorDataset(x, y)


def _by_hand(model: nn.Module, x: torch.Tensor, conditioner: Conditioner) -> Conditioning:
    with torch.no_grad(), eval_mode(model), capture_layer(model.fc1, keep_raw=True) as cap:
        out = model(x)
    return conditioner(cap.raw["input"], cap.raw["output"], out)


def _fit(conditioner, tmp_path, tokens=True):
    torch.manual_seed(0)
    model = TokenNet()
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", conditioner=conditioner, **TINY_HEAD)
    data = _data(tokens)
    with pytest.warns(UserWarning, match="uncalibrated"):
        ocd.fit(data, loss="mse", batch_size=8, num_train_steps=4, **TINY_TRAIN)
    return ocd, model, data, ocd.save_pretrained(tmp_path / "head")


@pytest.mark.parametrize("layer", ["conv", "fc1"])
def test_mean_pool_is_the_plain_mean_bit_for_bit(small_cnn, image_data, layer):
    x = image_data.tensors[0][:6]
    ocd = OCDWrapper.from_pretrained(small_cnn, layer=layer)
    assert type(ocd.conditioner) is MeanPool and ocd.conditioner.name == "mean"
    cond, out = ocd.conditioning(x)
    target = getattr(small_cnn, layer)
    with torch.no_grad(), eval_mode(small_cnn), capture_layer(target, keep_raw=True) as cap:
        ref_out = small_cnn(x)
    ref = (cap.layer_input, cap.layer_output, pool(ref_out))
    by_call = MeanPool()(cap.raw["input"], cap.raw["output"], ref_out, channels_first=layer == "conv")
    for got, want, called in zip(cond, ref, by_call):
        assert torch.equal(got, want) and torch.equal(called, want)
    if layer == "conv":  # channels first: the mean over the spatial dims
        assert torch.equal(cond.layer_input, cap.raw["input"].mean((2, 3)))


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "one-vector (closed form)"])
def test_collected_columns_are_the_conditioners(tmp_path, tokens):
    torch.manual_seed(0)
    model = TokenNet()
    data = _data(tokens, n=10)
    for conditioner in (OutputWeighted(), None):
        ocd = OCDWrapper.from_pretrained(model, layer="fc1", conditioner=conditioner)
        store = ocd.collect(data, loss="mse", batch_size=4, progress=False)
        want = _by_hand(model, data.tensors[0], conditioner or MeanPool())
        for key, w in zip(Conditioning._fields, want):
            torch.testing.assert_close(store.column(key), w, rtol=1e-5, atol=1e-6)
        assert store.column("model_output").shape[1] == (6 if conditioner else 3)
        assert store.manifest.get("conditioner") == (conditioner.name if conditioner else None)
        # inference reads the same conditioning
        cond, _ = ocd.conditioning(data.tensors[0][:3])
        for key, w in zip(Conditioning._fields, want):
            torch.testing.assert_close(getattr(cond, key), w[:3], rtol=1e-5, atol=1e-6)


def test_custom_conditioner_round_trip_and_refusals(tmp_path):
    ocd, model, data, folder = _fit(OutputWeighted(), tmp_path)
    assert ocd.shapes.output_dim == 6 and ocd.provenance.conditioner == "output-weighted"
    state = json.loads((tmp_path / "head" / STATE_NAME).read_text())
    assert state["provenance"]["conditioner"] == "output-weighted"
    x = data.tensors[0][:5]
    want = ocd(x, generator=torch.Generator().manual_seed(3))
    loaded = OCDWrapper.from_pretrained(model, folder, conditioner=OutputWeighted())
    assert torch.equal(loaded(x, generator=torch.Generator().manual_seed(3)), want)
    assert "output-weighted" in repr(loaded)
    card = (tmp_path / "head" / "README.md").read_text()
    assert "conditioner `output-weighted`" in card and "conditioner=...)" in card
    with pytest.raises(ValueError, match=r"'output-weighted'.*'mean'.*conditioner=") as err:
        OCDWrapper.from_pretrained(model, folder)
    assert "named 'output-weighted'" in str(err.value)
    # a collection made by one conditioner does not train a head for another
    store = ocd.collect(data, loss="mse", batch_size=8, progress=False)
    plain = OCDWrapper.from_pretrained(model, layer="fc1", loss="mse", **TINY_HEAD)
    with pytest.raises(ValueError, match="conditioner 'output-weighted'.*'mean'"):
        plain.train_head(store, **TINY_TRAIN)


def test_default_head_refuses_a_custom_conditioner_and_older_formats_load(tmp_path):
    ocd, model, data, folder = _fit(None, tmp_path)
    with pytest.raises(ValueError, match=r"'mean'.*'output-weighted'.*leave conditioner out"):
        OCDWrapper.from_pretrained(model, folder, conditioner=OutputWeighted())
    # a head saved before conditioners (format 4, no provenance.conditioner) is a mean-pooling head
    path = tmp_path / "head" / STATE_NAME
    state = json.loads(path.read_text())
    del state["provenance"]["conditioner"]
    path.write_text(json.dumps({**state, "format_version": 4}))
    loaded = OCDWrapper.from_pretrained(model, folder)
    x = data.tensors[0][:4]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert loaded.provenance.conditioner == "mean" and torch.equal(loaded(x, generator=g()), ocd(x, generator=g()))


def test_bad_conditioners_are_refused(small_cnn, image_data):
    class Flat(Conditioner):
        name = "flat"

        def __call__(self, layer_input, layer_output, model_output, channels_first=False):
            return Conditioning(pool(layer_input), pool(layer_output), model_output.sum(1))  # [B], not [B, d]

    with pytest.raises(TypeError, match="not an ocd_hf.Conditioner"):
        OCDWrapper.from_pretrained(small_cnn, layer="fc1", conditioner=lambda *a: None)
    ocd = OCDWrapper.from_pretrained(small_cnn, layer="fc1", conditioner=Flat())
    with pytest.raises(ValueError, match=r"'flat' returned model_output of shape \(4,\).*\[B, d\]"):
        ocd.conditioning(image_data.tensors[0][:4])
