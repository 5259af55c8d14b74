import pytest
import torch

from ocd_hf.losses import cross_entropy, mse, resolve_loss
from ocd_hf.overfit import overfit_batch, overfit_sequential


@pytest.mark.parametrize("layer_name", ["fc1", "fc2", "conv"])
@pytest.mark.parametrize("optimizer,lr,steps", [("adam", 5e-4, 3), ("sgd", 0.1, 2)])
def test_vectorized_equals_sequential_deepcopy(small_cnn, layer_name, optimizer, lr, steps):
    small_cnn.train()  # BatchNorm/Dropout present: overfitting must run in eval mode, then restore
    x = torch.randn(12, 1, 8, 8)
    y = torch.randint(0, 5, (12,))
    res = overfit_batch(
        small_cnn, small_cnn.get_submodule(layer_name), x, y, cross_entropy, steps=steps, lr=lr, optimizer=optimizer
    )
    ref = overfit_sequential(small_cnn, layer_name, x, y, cross_entropy, steps=steps, lr=lr, optimizer=optimizer)
    assert small_cnn.training
    assert res.delta.shape == (12, *small_cnn.get_submodule(layer_name).weight.shape)
    assert ref.abs().max() > 1e-5  # the deltas are not trivially zero
    torch.testing.assert_close(res.delta, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.scale, ref.flatten(1).std(1), atol=1e-6, rtol=1e-4)


def test_records_conditioning_from_unmodified_pass(small_cnn):
    small_cnn.eval()
    x = torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 5, (6,))
    res = overfit_batch(small_cnn, small_cnn.fc1, x, y, cross_entropy)
    with torch.no_grad():
        out = small_cnn(x)
    torch.testing.assert_close(res.model_output, out)
    torch.testing.assert_close(res.loss_before, cross_entropy(out, y))
    assert res.layer_input.shape == (6, 64) and res.layer_output.shape == (6, 24)
    # model weights untouched and no gradients accumulated in them
    assert small_cnn.fc1.weight.grad is None


def test_bias_option(small_cnn):
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    res = overfit_batch(small_cnn, small_cnn.fc2, x, y, cross_entropy, include_bias=True)
    assert res.delta_bias is not None and res.delta_bias.shape == (4, 5) and res.delta_bias.abs().sum() > 0


def test_nonfinite_deltas_stop(small_cnn):
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))
    x[2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"batch positions \[2\]"):
        overfit_batch(small_cnn, small_cnn.fc2, x, y, cross_entropy)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="integer class labels of shape"):
        cross_entropy(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shaped like the output"):
        mse(torch.randn(4, 2), torch.randn(3))
    with pytest.raises(ValueError, match="Unknown loss"):
        resolve_loss("hinge")
    torch.testing.assert_close(mse(torch.ones(3, 1), torch.zeros(3)), torch.ones(3))
