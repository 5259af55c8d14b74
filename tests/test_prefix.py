"""Prefix reuse: later passes skip the layers before the target and give the same outputs."""

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN
from torch import nn

from ocd_hf import OCDWrapper
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_batch
from ocd_hf.prefix import reuse_prefix


class Counted(nn.Module):
    """A Linear that counts how often its forward really runs."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.runs = 0

    def forward(self, x):
        self.runs += 1
        return self.lin(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = Counted(6, 8)
        self.shared = nn.Linear(8, 8)  # called twice: never reused
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True))
        self.target = nn.Linear(8, 8)
        self.tuple_mod = TupleOut()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.pre(x)
        h.relu_()  # an in-place edit of a reused output: must not compound across passes
        h = self.shared(self.shared(h))
        a, b = self.tuple_mod(h)
        h = self.block(a + b)
        return self.out(torch.relu(self.target(h)))


class TupleOut(nn.Module):
    def forward(self, h):
        return h * 2, h - 1


def _model():
    torch.manual_seed(0)
    return Net().eval()


def test_reused_passes_equal_full_passes_and_skip_the_prefix():
    m = _model()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    deltas = [torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(3)]
    ocd = OCDWrapper.from_pretrained(m, layer="target")
    ocd.reuse_prefix = False
    full = [ocd.forward_with_deltas(x, d) for d in deltas]
    m.pre.runs = 0
    with reuse_prefix(m, m.target) as cache:
        base = m(x)
        reused = [ocd.forward_with_deltas(x, d) for d in deltas]
    assert m.pre.runs == 1  # the prefix ran once for four passes
    assert m.shared not in cache.outputs and m.pre in cache.outputs and m.tuple_mod in cache.outputs
    for a, b in zip(full, reused):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(base, m(x), atol=0, rtol=0)
    # the block leaves nothing behind: the class forward is back
    assert "forward" not in m.pre.__dict__ and m.pre(x) is not None and m.pre.runs == 3


def test_overfit_batch_same_with_and_without_reuse():
    m = _model()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 6, generator=g), torch.randint(0, 3, (7,), generator=g)
    a = overfit_batch(m, m.target, x, y, cross_entropy, steps=3, lr=1e-2, reuse=True)
    b = overfit_batch(m, m.target, x, y, cross_entropy, steps=3, lr=1e-2, reuse=False)
    torch.testing.assert_close(a.delta, b.delta, atol=0, rtol=0)
    torch.testing.assert_close(a.layer_input, b.layer_input, atol=0, rtol=0)


def test_wrapper_forward_same_with_and_without_reuse():
    m = _model()
    g = torch.Generator().manual_seed(3)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    ocd = OCDWrapper.from_pretrained(m, layer="target", **TINY_HEAD).fit(
        data, "cross_entropy", num_train_steps=3, **TINY_TRAIN
    )
    x = data.tensors[0][:9]
    m.pre.runs = 0
    on = ocd(x, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert m.pre.runs == 1
    ocd.reuse_prefix = False
    off = ocd(x, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert m.pre.runs == 5
    torch.testing.assert_close(on, off, atol=0, rtol=0)


def test_a_layer_inside_the_prefix_of_another_is_not_frozen():
    # reuse is keyed to one target layer; the prefix of `target` contains block.0, which must still
    # respond to weights when it is itself the target
    m = _model()
    x = torch.randn(4, 6)
    ocd = OCDWrapper.from_pretrained(m, layer="block.0")
    d = torch.randn(4, 8, 8) * 0.5
    with reuse_prefix(m, m.block[0]):
        m(x)
        changed = ocd.forward_with_deltas(x, d)
    assert not torch.allclose(changed, m(x))


def test_selection_losses_same_with_and_without_reuse():
    from ocd_hf.integrations import get_adapter
    from ocd_hf.selection import perturbed_losses

    m = _model()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    adapter = get_adapter(m)
    runs = []
    for reuse in (True, False):
        m.pre.runs = 0
        # 7 perturbations in chunks of 3: two full chunks share the prefix, the last one runs alone
        losses = perturbed_losses(
            adapter, m.target, x, y, cross_entropy, 7, 0.1, torch.Generator().manual_seed(0), chunk_size=3, reuse=reuse
        )
        runs.append((losses, m.pre.runs))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=0, rtol=0)
    assert runs[0][1] == 2 and runs[1][1] == 3


class DictBody(nn.Module):
    """Returns a dict, as sentence-transformers modules do; its inner Linear must not be kept separately."""

    def __init__(self):
        super().__init__()
        self.inner = Counted(6, 8)

    def forward(self, x):
        return {"emb": self.inner(x), "mask": torch.ones(len(x), dtype=torch.long)}


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = DictBody()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x)["emb"] * 2)


def test_dict_outputs_are_reused_and_only_outermost_modules_kept():
    torch.manual_seed(0)
    m = DictNet().eval()
    x = torch.randn(4, 6)
    ocd = OCDWrapper.from_pretrained(m, layer="head")
    d = torch.randn(4, 3, 8) * 0.1
    ocd.reuse_prefix = False
    full = ocd.forward_with_deltas(x, d)
    m.body.inner.runs = 0
    with reuse_prefix(m, m.head) as cache:
        m(x)
        reused = ocd.forward_with_deltas(x, d)
    assert m.body.inner.runs == 1
    assert list(cache.outputs) == [m.body]  # not m.body.inner: the body's output already holds it
    torch.testing.assert_close(reused, full, atol=0, rtol=0)


class Functional(nn.Module):
    """Torch calls between modules before the target (as LeNet5's relu / max-pool), and an optional
    in-place edit of one of their results after the target."""

    def __init__(self, edit_after: bool = False):
        super().__init__()
        self.pre = Counted(6, 8)
        self.target = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.edit_after = edit_after

    def forward(self, x):
        h = torch.sin(self.pre(x)).view(-1, 2, 4).amax(1)  # sin and amax: calls in the model's own forward
        y = self.out(torch.relu(self.target(h)))
        if self.edit_after:
            h.mul_(2)  # edits a recorded result: later passes must not be handed the edited tensor
        return y + h.sum(1, keepdim=True)


class _CountSin(torch.overrides.TorchFunctionMode):
    """Counts torch.sin calls that are really computed (replayed ones never reach an outer mode)."""

    def __init__(self):
        super().__init__()
        self.sin = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.sin += func is torch.sin
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("edit_after", [False, True, "from the second pass"])
def test_ops_replay_skips_calls_before_the_target_and_gives_the_same_outputs(edit_after):
    torch.manual_seed(0)
    m = Functional(bool(edit_after)).eval()
    x = torch.randn(5, 6)
    deltas = [torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(3)]
    ocd = OCDWrapper.from_pretrained(m, layer="target")
    ocd.reuse_prefix = False
    edits = [edit_after is True or (bool(edit_after) and i > 0) for i in range(3)]
    full = []
    for edit, d in zip(edits, deltas):
        m.edit_after = edit
        full.append(ocd.forward_with_deltas(x, d))
    m.pre.runs = 0
    with _CountSin() as count, reuse_prefix(m, m.target, ops=True) as cache:
        reused = []
        for edit, d in zip(edits, deltas):
            m.edit_after = edit
            with cache.replaying():
                reused.append(ocd.forward_with_deltas(x, d))
    for a, b in zip(full, reused):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if edit_after == "from the second pass":  # a handed-out result edited in pass 2: pass 3 computes all
        assert count.sin == 2 and m.pre.runs == 2 and not cache.ops_on
    elif edit_after:  # the edit is seen when the recording pass ends: calls are not replayed, modules still are
        assert count.sin == 3 and m.pre.runs == 1 and not cache.ops_on
    else:  # sin and `pre` ran once; later passes got their recorded results
        assert count.sin == 1 and m.pre.runs == 1 and cache.ops_on


def test_ops_replay_keeps_in_place_edits_before_the_target_from_compounding():
    m = _model()  # Net edits the reused output of `pre` in place (h.relu_()) before the target
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    d = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.1
    ocd = OCDWrapper.from_pretrained(m, layer="target")
    ocd.reuse_prefix = False
    full = ocd.forward_with_deltas(x, d)
    reused = []
    with reuse_prefix(m, m.target, ops=True) as cache:
        for _ in range(3):
            with cache.replaying():
                reused.append(ocd.forward_with_deltas(x, d))
    for r in reused:
        torch.testing.assert_close(r, full, atol=0, rtol=0)
