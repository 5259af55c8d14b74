import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ocd_hf.per_sample import delta_output, per_sample_weights


def loop_reference(layer, x, delta, delta_bias=None):
    outs = []
    for b in range(x.shape[0]):
        w = layer.weight + delta[b]
        bias = None if layer.bias is None else layer.bias + (0 if delta_bias is None else delta_bias[b])
        xb = x[b : b + 1]
        if isinstance(layer, nn.Linear):
            outs.append(nn.functional.linear(xb, w, bias))
        elif isinstance(layer, Conv1D):
            outs.append(xb @ w + bias)
        elif isinstance(layer, nn.Conv2d):
            outs.append(nn.functional.conv2d(xb, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
        else:
            outs.append(nn.functional.conv1d(xb, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Linear(7, 5), (6, 7)),
        (nn.Linear(7, 5), (6, 3, 7)),  # token inputs
        (nn.Linear(7, 5, bias=False), (6, 2, 3, 7)),
        (Conv1D(5, 7), (6, 4, 7)),  # GPT-2 style, weight [in, out]
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (6, 4, 9, 9)),
        (nn.Conv2d(3, 5, (3, 2), dilation=2), (6, 3, 10, 8)),
        (nn.Conv1d(4, 6, 3, padding=1), (6, 4, 11)),
    ],
)
def test_matches_per_sample_loop(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    delta = torch.randn(shape[0], *layer.weight.shape) * 0.3
    delta_bias = None if getattr(layer, "bias", None) is None else torch.randn(shape[0], *layer.bias.shape)
    with per_sample_weights(layer, delta, delta_bias):
        out = layer(x)
    ref = loop_reference(layer, x, delta, delta_bias)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_zero_delta_is_identity_and_hook_removed():
    layer = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    base = layer(x)
    with per_sample_weights(layer, torch.zeros(5, 3, 4)):
        torch.testing.assert_close(layer(x), base)
    assert len(layer._forward_hooks) == 0


def test_hook_removed_after_error():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="per-sample deltas"):
        with per_sample_weights(layer, torch.zeros(2, 3, 4)):
            layer(torch.randn(5, 4))
    assert len(layer._forward_hooks) == 0


def test_gradient_reaches_only_own_delta():
    layer = nn.Linear(4, 3)
    delta = torch.zeros(3, 3, 4, requires_grad=True)
    x = torch.randn(3, 4)
    with per_sample_weights(layer, delta):
        layer(x)[1].sum().backward()
    assert delta.grad[0].abs().sum() == 0 and delta.grad[2].abs().sum() == 0
    assert delta.grad[1].abs().sum() > 0


def test_errors():
    with pytest.raises(TypeError, match="Linear, Conv1d, Conv2d"):
        with per_sample_weights(nn.Embedding(4, 3), torch.zeros(1, 4, 3)):
            pass
    with pytest.raises(TypeError, match="padding_mode"):
        with per_sample_weights(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), torch.zeros(1, 1, 1, 3, 3)):
            pass
    with pytest.raises(ValueError, match="do not fit"):
        with per_sample_weights(nn.Linear(4, 3), torch.zeros(2, 4, 3)):
            pass
    with pytest.raises(ValueError, match="batch"):
        delta_output(nn.Linear(4, 3), torch.randn(3, 4), torch.zeros(2, 3, 4))
