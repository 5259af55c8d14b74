import pytest
import torch
from torch import nn

from ocd_hf.capture import capture_layer, pool


def test_pooling_rule():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    torch.testing.assert_close(pool(t), t.mean(1))
    img = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(pool(img, channels_first=True), img.mean((2, 3)))
    assert pool(torch.randn(4)).shape == (4, 1)


def test_capture_linear_tokens_and_conv(small_cnn):
    x = torch.randn(3, 1, 8, 8)
    with capture_layer(small_cnn.conv) as cap_conv, capture_layer(small_cnn.fc1) as cap_fc:
        small_cnn.eval()(x)
    assert cap_conv.layer_input.shape == (3, 1) and cap_conv.layer_output.shape == (3, 4)
    ref = small_cnn.conv(x).mean((2, 3))
    torch.testing.assert_close(cap_conv.layer_output, ref)
    assert cap_fc.layer_input.shape == (3, 64) and cap_fc.layer_output.shape == (3, 24)
    lin = nn.Linear(6, 2)
    tok = torch.randn(4, 7, 6)
    with capture_layer(lin) as cap:
        lin(tok)
    torch.testing.assert_close(cap.layer_output, lin(tok).mean(1))
    torch.testing.assert_close(cap.layer_input, tok.mean(1))


def test_capture_does_not_change_output_and_is_removed_on_error(small_cnn):
    x = torch.randn(3, 1, 8, 8)
    small_cnn.eval()
    base = small_cnn(x)
    with capture_layer(small_cnn.fc1):
        torch.testing.assert_close(small_cnn(x), base)
    with pytest.raises(RuntimeError):
        with capture_layer(small_cnn.fc1):
            small_cnn(torch.randn(3, 2, 8, 8))  # wrong channel count
    assert not small_cnn.fc1._forward_hooks
