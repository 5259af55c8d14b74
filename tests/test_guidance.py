"""Classifier-free guidance: condition dropout in training, guided sampling, and that both are exact no-ops
at their defaults (cond_dropout=0, guidance_scale=1)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, SmallCNN, shapes_for, shapes_of

from ocd_hf import OCDConfig, OCDTrainingArguments, OCDWrapper
from ocd_hf.capture import Conditioning
from ocd_hf.collection import collect_deltas
from ocd_hf.denoiser import ConditionalUNet1D, drop_condition, null_condition
from ocd_hf.head import OCDHead
from ocd_hf.integrations import TorchAdapter
from ocd_hf.losses import cross_entropy
from ocd_hf.sampling import make_sampling_scheduler, sample_omega
from ocd_hf.training import latest_checkpoint, train_head

SHAPE = (6, 4)


SHAPES = shapes_for(SHAPE)


def cfg(**kw):
    return OCDConfig(layer="x", **{**TINY_HEAD, **kw})


def cond(b, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(
        torch.randn(b, 5, generator=g), torch.randn(b, shape[0], generator=g), torch.randn(b, 3, generator=g)
    )


class EncoderSpy:
    """Records what the denoiser's three condition encoders receive (forward pre-hooks on the real modules)."""

    def __init__(self, denoiser: ConditionalUNet1D):
        self.calls: list[Conditioning] = []
        self._pending: list[torch.Tensor] = []
        self._handles = [
            m.register_forward_pre_hook(self._hook)
            for m in (denoiser.enc_input, denoiser.enc_activation, denoiser.enc_output)
        ]

    def _hook(self, module, args):
        self._pending.append(args[0].detach().clone())
        if len(self._pending) == 3:
            self.calls.append(Conditioning(*self._pending))
            self._pending = []

    def remove(self):
        for h in self._handles:
            h.remove()


def manual_ddim(denoiser, normed, config, num_samples, seed, guidance_scale=None):
    """The DDIM loop written out by hand; guidance calls the denoiser twice (cond, then null) per step."""
    s = make_sampling_scheduler(config)
    b = normed.layer_input.shape[0]
    rep = Conditioning(*(c.repeat(num_samples, 1) for c in normed))
    null = Conditioning(*(torch.zeros_like(c) for c in rep))
    x = torch.randn((num_samples * b, *denoiser.weight_shape), generator=torch.Generator().manual_seed(seed))
    s.set_timesteps(config.num_inference_steps)
    denoiser.eval()
    with torch.no_grad():
        for t in s.timesteps:
            if guidance_scale is None:
                pred = denoiser(x, t, rep)
            else:
                c, u = denoiser(x, t, rep), denoiser(x, t, null)
                pred = u + guidance_scale * (c - u)
            x = s.step(pred, t, x, eta=0.0).prev_sample
    return x.reshape(num_samples, b, *denoiser.weight_shape)


# ---------------------------------------------------------------------------------------------- head
def test_null_condition_and_drop_condition():
    c = cond(4)
    assert all((z == 0).all() and z.shape == v.shape for z, v in zip(null_condition(c), c))
    assert drop_condition(c, None) is c
    d = drop_condition(c, torch.tensor([True, False, False, True]))
    for v, dv in zip(c, d):
        assert (dv[[0, 3]] == 0).all()
        torch.testing.assert_close(dv[[1, 2]], v[[1, 2]], atol=0, rtol=0)


def test_head_forward_drops_only_the_denoisers_condition():
    torch.manual_seed(0)
    head = OCDHead(cfg(), SHAPES)
    with torch.no_grad():  # non-trivial statistics, so that "zero after normalisation" is not "zero before"
        for k, d in (("layer_input", 5), ("layer_output", SHAPE[0]), ("model_output", 3)):
            getattr(head, f"{k}_mean").copy_(torch.randn(d))
            getattr(head, f"{k}_std").copy_(torch.rand(d) + 0.5)
    c = cond(3)
    normed = head.normalize(c)
    x, t = torch.randn(3, *SHAPE), torch.tensor([3, 400, 999])
    spy = EncoderSpy(head.denoiser)
    scale_seen = []
    h = head.scale_net.register_forward_pre_hook(lambda m, a: scale_seen.append(a[0]))
    drop = torch.tensor([True, False, True])
    pred, rho = head(x, t, c, drop)
    spy.remove(), h.remove()
    (seen,) = spy.calls
    for v, n in zip(seen, normed):
        assert (v[[0, 2]] == 0).all()  # dropped: exactly the null condition
        torch.testing.assert_close(v[1], n[1], atol=0, rtol=0)  # kept: the normalised I(x)
    for v, n in zip(scale_seen[0], normed):  # the scale net always sees the real conditioning
        torch.testing.assert_close(v, n, atol=0, rtol=0)
    # the dropped rows are the null-conditioned prediction; no mask is exactly the old forward
    with torch.no_grad():
        null_pred = head.denoiser(x, t, drop_condition(normed, drop))
        plain = head.denoiser(x, t, normed)
    torch.testing.assert_close(pred.detach(), null_pred, atol=0, rtol=0)
    torch.testing.assert_close(rho.detach(), head.scale_net(normed).detach(), atol=0, rtol=0)
    torch.testing.assert_close(head(x, t, c)[0].detach(), plain, atol=0, rtol=0)
    torch.testing.assert_close(head(x, t, c, torch.zeros(3, dtype=torch.bool))[0].detach(), plain, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallCNN()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    )
    a = TorchAdapter(model)
    return collect_deltas(
        model,
        "fc2",
        data,
        cross_entropy,
        tmp_path_factory.mktemp("c"),
        split_batch=a.split_batch,
        forward_fn=a.forward,
        batch_size=20,
        progress=False,
    )


def head_config(store, **kw):
    return OCDConfig(layer="fc2", **{**TINY_HEAD, **kw})


def train_args(steps, **kw):
    return OCDTrainingArguments(num_train_steps=steps, **{**TINY_TRAIN, **kw})


def trained(store, config, steps):
    torch.manual_seed(0)
    head = OCDHead(config, shapes_of(store))
    history = train_head(head, store, config, train_args(steps))
    return head, history


def assert_same_heads(a, b):
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=k)


def _legacy_forward(self, omega_t, timesteps, cond):
    """OCDHead.forward as it was before guidance: no drop argument at all."""
    normed = self.normalize(cond)
    return self.denoiser(omega_t, timesteps, normed), self.scale_net(normed)


def test_cond_dropout_zero_trains_exactly_as_before(store, monkeypatch):
    config = head_config(store)
    new, h_new = trained(store, config, 4)
    with monkeypatch.context() as m:
        m.setattr(OCDHead, "forward", _legacy_forward)  # a drop argument would raise TypeError here
        old, h_old = trained(store, config, 4)
    assert h_new == h_old
    assert_same_heads(new, old)
    # A dropout so small that no sample is dropped: the mask is drawn after every other draw of the
    # step's generator, so noise, timesteps and batches are unchanged and the run is identical too.
    tiny, h_tiny = trained(store, config.replace(cond_dropout=1e-12), 4)
    assert h_tiny == h_old
    assert_same_heads(tiny, old)


class TrainingSpy:
    """Per denoiser call in training: the encoders' inputs and the normalised raw I(x) the head was given."""

    def __init__(self, head):
        self.encoders = EncoderSpy(head.denoiser)
        self.normed: list[Conditioning] = []
        self.scale_inputs: list[Conditioning] = []
        self._h = [
            head.register_forward_pre_hook(lambda m, a: self.normed.append(m.normalize(a[2]))),
            head.scale_net.register_forward_pre_hook(lambda m, a: self.scale_inputs.append(a[0])),
        ]

    def remove(self):
        self.encoders.remove()
        for h in self._h:
            h.remove()


@pytest.mark.parametrize("p", [0.5, 0.999])
def test_dropped_samples_see_exactly_zero_condition(store, p):
    config = head_config(store, cond_dropout=p)
    torch.manual_seed(0)
    head = OCDHead(config, shapes_of(store))
    spy = TrainingSpy(head)
    train_head(head, store, config, train_args(3))
    spy.remove()
    assert len(spy.encoders.calls) == len(spy.normed) == 3
    dropped = kept = 0
    for seen, normed, scale_in in zip(spy.encoders.calls, spy.normed, spy.scale_inputs):
        is_null = torch.stack([(v == 0).all(1) for v in seen]).all(0)  # [B]: all three vectors zero
        for v, n in zip(seen, normed):
            torch.testing.assert_close(v[~is_null], n[~is_null].detach(), atol=0, rtol=0)
            assert (n[is_null] != 0).any()  # the real conditioning of a dropped sample was not zero
        for v, n in zip(scale_in, normed):
            torch.testing.assert_close(v.detach(), n.detach(), atol=0, rtol=0)
        dropped += int(is_null.sum())
        kept += int((~is_null).sum())
    if p == 0.999:
        assert kept == 0 and dropped == 3 * 16
    else:
        assert 0 < dropped < 3 * 16 and kept > 0


def test_resume_with_cond_dropout_is_exact(store, tmp_path):
    cfg_ = head_config(store, cond_dropout=0.3)
    args = train_args(12, output_dir=str(tmp_path / "a"), checkpoint_every=6)
    torch.manual_seed(0)
    straight = OCDHead(cfg_, shapes_of(store))
    h1 = train_head(straight, store, cfg_, args)
    assert latest_checkpoint(tmp_path / "a").name == "step-6"
    torch.manual_seed(123)
    resumed = OCDHead(cfg_, shapes_of(store))
    h2 = train_head(resumed, store, cfg_, args)
    assert [r["step"] for r in h2] == list(range(7, 13))
    assert [r["denoiser_loss"] for r in h2] == [r["denoiser_loss"] for r in h1[6:]]
    assert_same_heads(straight, resumed)
    # and the dropout did change training (otherwise this test would only repeat the existing one)
    plain, h3 = trained(store, cfg_.replace(cond_dropout=0.0), 12)
    assert [r["denoiser_loss"] for r in h3] != [r["denoiser_loss"] for r in h1]


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["sample", "epsilon"])
def test_guidance_scale_one_is_the_plain_single_pass(kind):
    torch.manual_seed(0)
    config = cfg(prediction_type=kind)
    d = ConditionalUNet1D(config, SHAPES)
    c = cond(3)
    calls = []
    h = d.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at w == 1, even though cond_dropout is 0
        out = sample_omega(
            d, c, make_sampling_scheduler(config), 10, 2, torch.Generator().manual_seed(5), guidance_scale=1.0
        )
        default = sample_omega(d, c, make_sampling_scheduler(config), 10, 2, torch.Generator().manual_seed(5))
    h.remove()
    assert calls == [6] * 20  # one un-doubled pass per step
    torch.testing.assert_close(out, manual_ddim(d, c, config, 2, 5), atol=0, rtol=0)
    torch.testing.assert_close(default, out, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("w", [0.0, 3.0])
def test_guidance_equals_hand_combination(kind, w):
    torch.manual_seed(0)
    config = cfg(prediction_type=kind, cond_dropout=0.1)
    d = ConditionalUNet1D(config, SHAPES)
    c = cond(3)
    calls = []
    h = d.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained with dropout: no warning
        out = sample_omega(
            d, c, make_sampling_scheduler(config), 10, 2, torch.Generator().manual_seed(5), guidance_scale=w
        )
    h.remove()
    assert calls == [12] * 10  # cond and null in one doubled batch, once per step
    # by hand: the denoiser called twice per step; batch size changes float summation order only
    expected = manual_ddim(d, c, config, 2, 5, guidance_scale=w)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    plain = manual_ddim(d, c, config, 2, 5)
    assert (out - plain).abs().max() > 1e-3  # guidance does change the samples


class LinearX0(ConditionalUNet1D):
    """Predicts a clean sample linear in the (normalised) conditioning: DDIM lands exactly on it."""

    def forward(self, omega_t, t, c):
        v = torch.cat([c.layer_input, c.layer_output, c.model_output], 1)  # [B, 5 + rows + 3]
        return (v[:, : SHAPE[0], None] * self.a + self.b).expand_as(omega_t)


def test_guidance_lands_on_extrapolated_prediction():
    config = cfg(prediction_type="sample", cond_dropout=0.2)
    torch.manual_seed(0)
    d = LinearX0(config, SHAPES)
    d.a, d.b = torch.randn(1, 1, SHAPE[1]), torch.randn(1, *SHAPE)
    c = cond(3)
    w = 2.5
    out = sample_omega(d, c, make_sampling_scheduler(config), 10, 2, torch.Generator().manual_seed(0), guidance_scale=w)
    z = torch.zeros(3, *SHAPE)
    cond_x0, null_x0 = d(z, 0, c), d(z, 0, null_condition(c))
    torch.testing.assert_close(out, (null_x0 + w * (cond_x0 - null_x0)).expand(2, 3, *SHAPE), atol=1e-4, rtol=1e-4)


def test_guidance_without_dropout_warns_once_but_runs():
    torch.manual_seed(0)
    config = cfg()  # cond_dropout = 0
    d = ConditionalUNet1D(config, SHAPES)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = sample_omega(
            d, cond(2), make_sampling_scheduler(config), 10, 1, torch.Generator().manual_seed(0), guidance_scale=2.0
        )
    msgs = [str(r.message) for r in rec if issubclass(r.category, UserWarning)]
    assert len(msgs) == 1 and "cond_dropout=0" in msgs[0]  # once per call, not once per step
    expected = manual_ddim(d, cond(2), config, 1, 0, guidance_scale=2.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- wrapper
def test_wrapper_uses_guidance_scale_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g)
    )
    ocd = OCDWrapper.from_pretrained(model, layer="fc2", cond_dropout=0.25, guidance_scale=2.5, **TINY_HEAD)
    ocd.fit(data, loss="cross_entropy", batch_size=12, num_train_steps=3, **TINY_TRAIN)
    x = data.tensors[0][:5]
    cond_, _ = ocd.conditioning(x)

    def deltas(o, w=None):
        saved = o.config
        o.config = saved if w is None else saved.replace(guidance_scale=w)
        try:
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                out = o.generate_deltas(cond_, 2, torch.Generator().manual_seed(0))
        finally:
            o.config = saved
        assert not [r for r in rec if "cond_dropout" in str(r.message)]  # trained with dropout: no warning
        return out

    guided = deltas(ocd)
    # the wrapper's deltas are the guided DDIM samples times the scale net's ρ̂
    head = ocd.head
    normed = head.normalize(cond_)
    omega = sample_omega(
        head.denoiser,
        normed,
        make_sampling_scheduler(ocd.config),
        ocd.config.num_inference_steps,
        2,
        torch.Generator().manual_seed(0),
        guidance_scale=2.5,
    )
    rho = head.scale_net(normed) * ocd.delta_scale
    torch.testing.assert_close(guided, (omega * rho.view(1, -1, 1, 1)).to(guided.dtype), atol=0, rtol=0)
    assert (guided - deltas(ocd, 1.0)).abs().max() > 0  # guidance_scale reaches the sampler

    folder = ocd.save_pretrained(tmp_path / "head")
    loaded = OCDWrapper.from_pretrained(model, folder)
    assert loaded.config.cond_dropout == 0.25 and loaded.config.guidance_scale == 2.5
    assert loaded.head.denoiser.cond_dropout == 0.25
    torch.testing.assert_close(deltas(loaded), guided, atol=0, rtol=0)
