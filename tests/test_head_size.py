import json

import pytest
import torch
from conftest import TINY_TRAIN, shapes_for
from torch.utils.data import TensorDataset

from ocd_hf import OCDWrapper
from ocd_hf.config import AUTO, ConfigError, OCDConfig, resolve_sizes
from ocd_hf.head import OCDHead


@pytest.mark.parametrize(
    "target_shape, channels",
    [
        ((16, 32), (16, 16, 32)),  # 512 numbers
        ((84, 120), (32, 32, 64)),  # the demo's fc2
        ((4096, 1), (32, 32, 64)),  # a factored 4096-wide target
        ((6, 2, 3, 3), (16, 16, 32)),  # a conv kernel
        ((512, 512), (64, 64, 128)),  # large layers keep the pre-sizing default
    ],
)
def test_auto_sizes_follow_the_target(target_shape, channels):
    c = resolve_sizes(OCDConfig(), target_shape)
    assert c.block_out_channels == channels
    assert c.cond_hidden_dim == c.scale_hidden_dim == 2 * channels[0]
    head = OCDHead(OCDConfig(), shapes_for(target_shape, target_shape=target_shape))
    assert tuple(head.denoiser.unet.config.block_out_channels) == channels
    assert head.denoiser.enc_input.net[0].out_features == 2 * channels[0]
    assert head.scale_net.net[0].out_features == 2 * channels[0]


def test_explicit_sizes_are_kept_and_resolving_is_idempotent():
    c = OCDConfig(block_out_channels=(8, 8), cond_hidden_dim=5)
    r = resolve_sizes(c, (84, 120))
    assert r.block_out_channels == (8, 8) and r.cond_hidden_dim == 5 and r.scale_hidden_dim == 64
    assert resolve_sizes(r, (16, 32)) == r  # once resolved, the shape no longer matters


def test_auto_width_respects_norm_num_groups():
    c = resolve_sizes(OCDConfig(norm_num_groups=12), (16, 32))
    assert c.block_out_channels == (24, 24, 48)
    with pytest.raises(ConfigError, match="norm_num_groups"):
        OCDConfig(norm_num_groups=12, block_out_channels=(16, 16, 32))
    with pytest.raises(ConfigError, match="block_out_channels"):
        OCDConfig(block_out_channels=())
    with pytest.raises(ConfigError, match="cond_hidden_dim"):
        OCDConfig(cond_hidden_dim="big")


@pytest.mark.filterwarnings("ignore:fit\\(\\) without eval_dataset", "ignore:Sampled deltas")
def test_auto_sized_head_saves_resolved_sizes_and_round_trips_bit_for_bit(small_cnn, tmp_path):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g))
    ocd = OCDWrapper.from_pretrained(small_cnn, layer="fc2")
    assert ocd.config.block_out_channels == AUTO
    ocd.fit(data, loss="cross_entropy", batch_size=12, num_train_steps=2, **TINY_TRAIN)
    assert ocd.config.block_out_channels == (16, 16, 32)  # fc2 is 5x24: the smallest width
    ocd.save_pretrained(tmp_path / "h")
    saved = json.loads((tmp_path / "h" / "ocd_config.json").read_text())
    assert saved["block_out_channels"] == [16, 16, 32] and saved["cond_hidden_dim"] == 32
    again = OCDWrapper.from_pretrained(small_cnn, tmp_path / "h")
    a, b = ocd.require_head().state_dict(), again.require_head().state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    x = data.tensors[0][:4]
    out_a = ocd(x, generator=torch.Generator().manual_seed(3))
    out_b = again(x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
