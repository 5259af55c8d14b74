import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocd_hf import OCDTrainingArguments
from ocd_hf.collection import collect_deltas
from ocd_hf.config import ConfigError
from ocd_hf.integrations import TorchAdapter
from ocd_hf.losses import cross_entropy
from ocd_hf.memory import CollectionMemoryError, parse_memory, plan_collection
from ocd_hf.overfit import OverfitSettings, overfit_batch, probe_layer

SRC = Path(__file__).resolve().parents[1] / "src"


def collect(model, layer, data, path, settings, max_memory, loss=cross_entropy):
    a = TorchAdapter(model)
    return collect_deltas(
        model,
        layer,
        data,
        loss,
        path,
        settings,
        split_batch=a.split_batch,
        forward_fn=a.forward,
        batch_size=16,
        shard_size=32,
        max_memory=max_memory,
        progress=False,
    )


def budget_for_chunk(model, layer, data, settings, chunk):
    """A max_memory that makes collection split each batch into chunks of `chunk` samples."""
    x = data.tensors[0][:2]
    mod = model.get_submodule(layer)
    kw = dict(optimizer=settings.optimizer, target=settings.target, batch_size=16, shard_size=32)
    probe = probe_layer(model, mod, x)
    big = plan_collection(layer, mod, num_samples=len(data), probe=probe, max_memory="1TiB", **kw)
    shards = big.stored_bytes * 32  # one shard of 32 samples is held while it is assembled
    plan = plan_collection(
        layer, mod, num_samples=len(data), probe=probe, max_memory=shards + chunk * big.sample_bytes + 1, **kw
    )
    assert plan.chunk_size == chunk
    return shards + chunk * big.sample_bytes + 1


@pytest.mark.parametrize(
    "layer,settings",
    [
        ("fc1", OverfitSettings()),
        ("conv", OverfitSettings(optimizer="sgd", lr=0.1)),
        ("fc1", OverfitSettings(target="factored")),
        ("fc1", OverfitSettings(target="factored", optimizer="sgd", lr=0.1, include_bias=True)),
    ],
)
def test_chunked_collection_equals_unchunked(small_cnn, image_data, tmp_path, layer, settings):
    whole = collect(small_cnn, layer, image_data, tmp_path / "whole", settings, "1TiB")
    budget = budget_for_chunk(small_cnn, layer, image_data, settings, 3)
    chunked = collect(small_cnn, layer, image_data, tmp_path / "chunked", settings, budget)
    a, b = whole.get_batch(range(40)), chunked.get_batch(range(40))
    assert "delta" in a and ("energy" in a) == (settings.target == "factored")
    # every chunk holds exactly what overfit_batch gives on those samples, bit for bit
    x, y = image_data.tensors
    mod = small_cnn.get_submodule(layer)
    s = settings
    for lo, hi in ((0, 3), (15, 16), (16, 19), (31, 32), (38, 40)):  # chunks of the batches of 16
        r = overfit_batch(
            small_cnn,
            mod,
            x[lo:hi],
            y[lo:hi],
            cross_entropy,
            steps=s.steps,
            lr=s.lr,
            optimizer=s.optimizer,
            include_bias=s.include_bias,
            target=s.target,
        )
        for key in ("delta", "scale", "layer_input", "layer_output", "model_output", "loss_before"):
            assert torch.equal(b[key][lo:hi], getattr(r, key)), key
    # against the unchunked collection the only difference is the base model's matrix products: BLAS sums
    # in another order for 3 rows than for 16, which moves outputs by an ulp (float32: ~6e-8 relative)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6 * float(a[key].abs().max()), msg=key)


def test_impossible_request_fails_before_allocating(small_cnn, image_data, tmp_path):
    calls = []

    def loss(out, y):
        calls.append(1)
        return cross_entropy(out, y)

    with pytest.raises(CollectionMemoryError) as e:
        collect(small_cnn, "fc1", image_data, tmp_path / "c", OverfitSettings(), 20_000, loss=loss)
    msg = str(e.value)
    assert "'fc1'" in msg and "(24, 64)" in msg and "per sample" in msg
    for option in ('target="factored"', 'overfit_optimizer="sgd"', "shard_size", "max_memory"):
        assert option in msg
    assert calls == [] and not list((tmp_path / "c").glob("shard-*"))


def test_plan_for_a_4096_square_layer():
    layer = nn.Linear(4096, 4096)
    kw = dict(batch_size=64, shard_size=4096, num_samples=64, max_memory="8GiB")
    full = plan_collection("2", layer, optimizer="adam", target="full", **kw)
    # delta, gradient, two moments and a temporary: 5 x 64 MiB per sample; the shard holds 64 MiB per sample
    assert full.sample_bytes == 5 * 2**26 and full.chunk_size == (8 * 2**30 - 64 * full.stored_bytes) // (5 * 2**26)
    with pytest.raises(CollectionMemoryError, match="512.0 MiB"):
        plan_collection("2", layer, optimizer="adam", target="full", **{**kw, "max_memory": "512MiB"})
    from ocd_hf.memory import LayerProbe

    probe = LayerProbe(input_shape=(4096,), output_numel=4096, model_output_numel=4, calls=1)
    fac = plan_collection("2", layer, optimizer="adam", target="factored", probe=probe, **kw)
    assert fac.method == "rank-one-adam" and fac.chunk_size == 64 and fac.sample_bytes < 2**20
    tokens = LayerProbe(input_shape=(7, 4096), output_numel=7 * 4096, model_output_numel=4, calls=1)
    assert plan_collection("2", layer, optimizer="adam", target="factored", probe=tokens, **kw).method == "full"


def test_parse_memory_and_training_argument():
    assert parse_memory("8GiB") == 8 * 2**30 and parse_memory("500 MB") == 500 * 10**6 and parse_memory(1024) == 1024
    assert parse_memory(None) is None
    for bad in ("lots", "-1GB", 0, "3 parsecs"):
        with pytest.raises(ValueError, match="max_memory"):
            parse_memory(bad)
    assert OCDTrainingArguments(max_memory="2GiB").max_memory == "2GiB"
    with pytest.raises(ConfigError, match="max_memory"):
        OCDTrainingArguments(max_memory="lots")


def test_rank_one_adam_matches_full_adam_projection():
    """Adam on [B, out] equals Adam on the full delta, projected, up to Adam's eps (|g| / (|g| + eps) -> 1)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    kw = dict(steps=3, lr=1e-2, target="factored", include_bias=True)
    full = overfit_batch(m, m[2], x, y, cross_entropy, method="full", **kw)
    fast = overfit_batch(m, m[2], x, y, cross_entropy, **kw)
    assert F.cosine_similarity(fast.delta, full.delta).min() > 1 - 1e-6
    # the difference is Adam's eps: it shrinks entries whose gradient |δ_o a_i| is near 1e-8
    torch.testing.assert_close(fast.delta, full.delta, rtol=0, atol=2e-3 * full.delta.abs().max().item())
    torch.testing.assert_close(fast.energy, full.energy, rtol=1e-3, atol=0)
    torch.testing.assert_close(fast.delta_bias, full.delta_bias, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fast.model_output, full.model_output, rtol=0, atol=0)


def test_rank_one_adam_step_one_is_exact_without_eps_effects():
    """One step from zero state, with gradients far above eps: u = -lr·sign(δ)·‖a‖₁/‖a‖₂ exactly as full Adam."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    m = nn.Sequential(lin)
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0], [0.25, 1.0, -1.0, 2.0, -0.5]], dtype=torch.float64)
    y = torch.tensor([0, 3])
    full = overfit_batch(m, lin, x, y, cross_entropy, steps=1, lr=0.1, target="factored", method="full")
    fast = overfit_batch(m, lin, x, y, cross_entropy, steps=1, lr=0.1, target="factored")
    torch.testing.assert_close(fast.delta, full.delta, rtol=1e-6, atol=0)
    nnz = (x != 0).sum(1)
    torch.testing.assert_close(fast.energy, x.abs().sum(1) ** 2 / (x.pow(2).sum(1) * nnz))


@pytest.mark.parametrize("samples", [64])
def test_4096_layer_default_fit_stays_under_3gib(tmp_path, samples):
    """The docs' 4096x4096 example with default overfitting (Adam): peak RSS growth of a child process."""
    script = textwrap.dedent(
        f"""
        import resource, sys, torch
        torch.set_num_threads(1)
        from torch import nn
        from torch.utils.data import TensorDataset
        from ocd_hf import OCDConfig, OCDWrapper
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4))
        data = TensorDataset(torch.randn({samples}, 16), torch.randint(0, 4, ({samples},)))
        cfg = OCDConfig(target="factored", block_out_channels=(16, 16, 32), cond_hidden_dim=16, scale_hidden_dim=16)
        ocd = OCDWrapper.from_pretrained(m, layer="2", config=cfg)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ocd.fit(data, loss="cross_entropy", num_train_steps=2, train_batch_size=8, progress=False)
        out = ocd(data.tensors[0][:2], generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out).all()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    grown = int(res.stdout.strip().splitlines()[-1])
    # one batch of full Adam deltas would be 4 x [samples, 4096, 4096] float32 = 4 GiB at 64 samples
    assert grown < 3 * 2**30, f"peak RSS grew by {grown / 2**30:.2f} GiB"


def test_fit_passes_max_memory_and_overfit_settings(small_cnn, image_data):
    from conftest import TINY_HEAD, TINY_TRAIN

    from ocd_hf import OCDConfig, OCDWrapper

    cfg = OCDConfig(layer="fc1", overfit_steps=2, overfit_lr=1e-3, overfit_optimizer="sgd", target="factored")
    assert OverfitSettings.from_config(cfg) == OverfitSettings(2, 1e-3, "sgd", False, "factored")
    ocd = OCDWrapper.from_pretrained(small_cnn, layer="fc1", **TINY_HEAD)
    with pytest.raises(CollectionMemoryError, match="'fc1'"):
        ocd.fit(image_data, loss="cross_entropy", num_train_steps=1, max_memory=1000, **TINY_TRAIN)


@pytest.mark.parametrize("closed_form", [False, True])
def test_reused_buffers_give_identical_deltas(small_cnn, closed_form):
    from ocd_hf.buffers import reuse_buffers

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 5, (20,), generator=g)
    chunks = ((0, 8), (8, 16), (16, 20))
    kw = dict(closed_form=closed_form)
    plain = [overfit_batch(small_cnn, small_cnn.fc1, x[a:b], y[a:b], cross_entropy, **kw) for a, b in chunks]
    with reuse_buffers() as pool:
        for (a, b), ref in zip(chunks, plain):
            r = overfit_batch(small_cnn, small_cnn.fc1, x[a:b], y[a:b], cross_entropy, **kw)
            assert torch.equal(r.delta, ref.delta) and torch.equal(r.scale, ref.scale)
            if closed_form:  # no gradient of the weight's shape is ever formed
                assert "grad" not in pool.spare and "delta" in pool.buffers
            elif b == 8:
                grad_buffer = pool.spare["grad"].data_ptr()
            elif b == 16:  # same chunk shape: autograd wrote the gradient into the pooled buffer again
                assert pool.spare["grad"].data_ptr() == grad_buffer
    assert not pool.buffers and not pool.spare
