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


@pytest.mark.parametrize("closed_form", [True, False])
def test_batch_mean_loss_is_refused_on_both_paths(small_cnn, closed_form):
    """A loss reduced over the batch would give every sample the batch's gradient: refused by name."""
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,))

    def batch_mean(out, target):
        return cross_entropy(out, target).mean()

    with pytest.raises(ValueError, match=r"one value per sample \(\[4\]\); got \(\)"):
        overfit_batch(small_cnn, small_cnn.fc2, x, y, batch_mean, closed_form=closed_form)


class _Conv1DNet(torch.nn.Module):
    """A GPT-2 style Conv1D (weight [in, out]) between two Linears."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.inp = torch.nn.Linear(6, 10)
        self.mid = Conv1D(7, 10)
        self.out = torch.nn.Linear(7, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.relu(self.inp(x)))))


@pytest.mark.parametrize("optimizer,lr", [("adam", 5e-4), ("sgd", 0.1)])
@pytest.mark.parametrize("case", ["plain", "confident", "conv1d"])
def test_closed_form_equals_sequential_and_general_path(small_cnn, optimizer, lr, case):
    """The closed form (one input vector per sample) against the deepcopy loop and the general path.

    "confident": fc2's weights scaled up so most samples are classified with near-certainty; their
    output gradients fall to 1e-9 and below, where Adam's eps dominates the step (eps is not dropped).
    Tolerance: both paths are float32 Adam; the closed form evaluates the same formula in another
    order, so the two differ by float rounding (observed ~1e-7 relative; allowed 1e-5 x max|Δ|). The
    deepcopy loop's delta is (W + Δ) - W in float32, exact only to a few ulps of W: allowed on top.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if case == "conv1d":
        model, name = _Conv1DNet().eval(), "mid"
        x, y = torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)
    else:
        model, name = small_cnn.eval(), "fc2"
        x, y = torch.randn(10, 1, 8, 8, generator=g), torch.randint(0, 5, (10,), generator=g)
        if case == "confident":
            with torch.no_grad():
                model.fc2.weight.mul_(60.0)
            y = model(x).argmax(1)
    layer = model.get_submodule(name)
    kw = dict(steps=3, lr=lr, optimizer=optimizer)
    fast = overfit_batch(model, layer, x, y, cross_entropy, include_bias=True, **kw)
    general = overfit_batch(model, layer, x, y, cross_entropy, include_bias=True, closed_form=False, **kw)
    ref = overfit_sequential(model, name, x, y, cross_entropy, include_bias=True, **kw)
    if case == "confident":
        assert (general.loss_before < 1e-6).sum() >= 3  # the eps regime is really exercised
    tol = 1e-5 * ref.abs().max().item()
    ulps = 4 * torch.finfo(torch.float32).eps * layer.weight.abs().max().item()
    assert fast.delta.shape == ref.shape and fast.delta.is_contiguous() == (case != "conv1d")
    torch.testing.assert_close(fast.delta, ref, atol=tol + ulps, rtol=0)
    torch.testing.assert_close(fast.delta, general.delta, atol=tol, rtol=0)
    bias_tol = 1e-5 * general.delta_bias.abs().max().item()
    torch.testing.assert_close(fast.delta_bias, general.delta_bias, atol=bias_tol, rtol=0)
    torch.testing.assert_close(fast.scale, general.scale, rtol=1e-5, atol=0)
    for key in ("layer_input", "layer_output", "model_output", "loss_before"):
        torch.testing.assert_close(getattr(fast, key), getattr(general, key), rtol=1e-6, atol=1e-7, msg=key)


def test_closed_form_only_backpropagates_through_the_layers_after_the_target(small_cnn):
    """The target's output is a leaf: no gradient reaches the conv stack or fc1, and the conv runs once."""

    class CountedConv(torch.nn.Conv2d):
        runs = 0

        def forward(self, x):
            CountedConv.runs += 1
            return super().forward(x)

    conv = CountedConv(1, 4, 3, padding=1)
    conv.load_state_dict(small_cnn.conv.state_dict())
    small_cnn.conv = conv
    small_cnn.eval()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 5, (5,))
    overfit_batch(small_cnn, small_cnn.fc2, x, y, cross_entropy)
    assert CountedConv.runs == 2  # the one-sample probe and the first pass; later passes reuse the prefix
    assert all(p.grad is None for p in small_cnn.parameters())
