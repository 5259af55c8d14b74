"""layer="auto": candidates, the Eq. 6 entropy score, the report and the wrapper integration."""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ocd_hf import OCDWrapper, SelectionReport, select_layer
from ocd_hf.integrations import get_adapter
from ocd_hf.losses import mse
from ocd_hf.selection import kde_entropy, perturbed_losses, silverman_bandwidth

K = 200  # perturbations per layer in these tests: enough for a stable KDE, cheap on 2 cores


class Toy(nn.Module):
    """`big` dominates: its output is scaled by 100, `small`'s by 0.01. The others have no useful gradient."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(4, 3)
        self.small = nn.Linear(4, 3)
        self.detached = nn.Linear(4, 3)  # output detached: no gradient path
        self.zeroed = nn.Linear(4, 3)  # output multiplied by zero: gradient exists but is all zero
        self.unused = nn.Linear(4, 3)  # never called
        self.norm = nn.LayerNorm(3)  # not a weight layer: ignored, not listed

    def forward(self, x):
        out = 100.0 * self.big(x) + 0.01 * self.small(x) + self.detached(x).detach() + 0.0 * self.zeroed(x)
        return self.norm(out) + out


def toy_batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return Toy().eval()


def test_dominant_layer_wins_and_dead_layers_are_never_candidates(toy):
    report = select_layer(toy, toy_batch(), loss="mse", num_perturbations=K)
    assert isinstance(report, SelectionReport)
    assert report.winner == "big" and report.runner_up == "small"
    assert [s.name for s in report.scores] == ["big", "small"]
    # a factor 10^4 in loss spread is ~log(10^4) nats per sample
    assert report.score_of("big") - report.score_of("small") > 16 * 5
    assert report.dropped["detached"] == "no gradient path to the loss"
    assert report.dropped["unused"] == "no gradient path to the loss"
    assert report.dropped["zeroed"] == "zero gradient on the selection batch"
    assert "norm" not in report.dropped
    assert report.num_perturbations == K and report.num_samples == 16 and report.sigma == 0.1


def test_selection_leaves_the_model_as_it_was(toy):
    toy.train()
    toy.small.weight.requires_grad_(False)
    before = copy.deepcopy(toy.state_dict())
    try:
        select_layer(toy, toy_batch(), loss="mse", num_perturbations=K)
        assert toy.training and not toy.small.weight.requires_grad
        assert all(torch.equal(before[k], v) for k, v in toy.state_dict().items())
        assert not toy._forward_hooks and not any(m._forward_hooks for m in toy.modules())
    finally:
        toy.eval()
        toy.small.weight.requires_grad_(True)


def test_same_seed_same_scores_and_scores_do_not_depend_on_the_candidate_list(toy):
    a = select_layer(toy, toy_batch(), loss="mse", num_perturbations=K, seed=3)
    b = select_layer(toy, toy_batch(), loss="mse", num_perturbations=K, seed=3)
    c = select_layer(toy, toy_batch(), loss="mse", num_perturbations=K, seed=4)
    only = select_layer(toy, toy_batch(), loss="mse", num_perturbations=K, seed=3, layer=["small"])
    assert [(s.name, s.score) for s in a.scores] == [(s.name, s.score) for s in b.scores]
    assert a.score_of("small") != c.score_of("small")
    assert only.score_of("small") == a.score_of("small") and only.winner == "small" and only.runner_up is None


def test_batched_perturbations_match_a_loop_over_weight_copies(toy):
    x, y = toy_batch(5)
    adapter = get_adapter(toy)
    std = 0.05
    batched = perturbed_losses(adapter, toy.small, x, y, mse, 7, std, torch.Generator().manual_seed(1), chunk_size=3)
    g = torch.Generator().manual_seed(1)
    rows = []
    for p in (3, 3, 1):  # same chunks, so the generator yields the same draws
        eps = torch.empty((p, *toy.small.weight.shape)).normal_(0.0, std, generator=g)
        for e in eps:
            m = copy.deepcopy(toy)
            with torch.no_grad():
                m.small.weight += e
                rows.append(mse(m(x), y))
    torch.testing.assert_close(batched, torch.stack(rows).T.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["normal", "bimodal", "heavy_tailed", "constant_plus_outlier"])
def test_kde_entropy_matches_scipy_gaussian_kde(kind):
    from scipy.stats import gaussian_kde

    rng = np.random.default_rng(0)
    data = {
        "normal": rng.normal(2.0, 0.5, 300),
        "bimodal": np.concatenate([rng.normal(0, 1, 150), rng.normal(6, 0.2, 50)]),
        "heavy_tailed": rng.standard_cauchy(300),
        "constant_plus_outlier": np.concatenate([rng.normal(0, 1e-3, 99), [5.0]]),
    }[kind]
    kde = gaussian_kde(data, bw_method="silverman")
    h = float(np.sqrt(kde.covariance[0, 0]))
    assert float(silverman_bandwidth(torch.tensor(data)[None])[0]) == pytest.approx(h, rel=1e-10)
    # reference: -∫ p log p of scipy's KDE by the trapezoid rule on a fine grid around every point
    xs = np.unique(np.concatenate([np.linspace(d - 10 * h, d + 10 * h, 401) for d in data]))
    p = kde.pdf(xs)
    ref = -np.trapezoid(p * np.log(np.maximum(p, 1e-300)), xs)
    assert float(kde_entropy(torch.tensor(data))) == pytest.approx(ref, abs=1e-4)


def test_kde_entropy_rows_and_constant_rows():
    v = torch.randn(3, 500, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = kde_entropy(v)
    assert torch.allclose(rows, torch.stack([kde_entropy(r) for r in v]))
    # Gaussian data: the KDE is close to N(0, 1 + h²)
    assert rows.mean().item() == pytest.approx(0.5 * np.log(2 * np.pi * np.e * (1 + 0.2**2)), abs=0.1)
    const = kde_entropy(torch.zeros(2, 50))
    assert torch.isfinite(const).all() and (const < -10).all()


def test_no_candidate_left_says_why_each_layer_was_dropped(toy):
    with pytest.raises(ValueError, match="No candidate layer left") as e:
        select_layer(toy, toy_batch(), loss="mse", num_perturbations=K, max_weights=5)
    assert "big: too large (12 weights > max_weights=5)" in str(e.value)
    with pytest.raises(ValueError, match="No candidate layer left") as e:
        select_layer(toy, toy_batch(), loss="mse", layer=["detached", "zeroed", "unused"])
    assert str(e.value).endswith(
        "Dropped: detached: no gradient path to the loss; zeroed: zero gradient on the selection batch; "
        "unused: no gradient path to the loss."
    )


def test_unknown_layer_name_lists_candidates(toy):
    with pytest.raises(ValueError, match="No layer named 'nope'") as e:
        select_layer(toy, toy_batch(), loss="mse", layer="nope")
    assert "'big'" in str(e.value) and "'small'" in str(e.value)


def test_unsupported_named_layer_is_dropped_with_reason(toy):
    with pytest.raises(ValueError, match="norm: unsupported layer type LayerNorm"):
        select_layer(toy, toy_batch(), loss="mse", layer=["norm"])


def test_a_batch_the_model_cannot_run_is_reported_as_such(toy):
    with pytest.raises(RuntimeError, match="selection batch could not be run through the model") as e:
        select_layer(toy, (torch.randn(8, 5), torch.randn(8, 3)), loss="mse")
    assert e.value.__cause__ is not None
    with pytest.raises(ValueError, match="needs a loss"):
        select_layer(toy, toy_batch())


def test_layers_the_adapter_leaves_out_are_dropped(toy):
    from ocd_hf.integrations import TorchAdapter

    class NoSmall(TorchAdapter):
        def candidate_layers(self):
            return {n: m for n, m in super().candidate_layers().items() if n != "small"}

    report = select_layer(toy, toy_batch(), loss="mse", num_perturbations=16, adapter=NoSmall(toy))
    assert [s.name for s in report.scores] == ["big"]
    assert report.dropped["small"] == "not a candidate layer of the torch adapter"
    assert report.dropped["unused"] == "no gradient path to the loss"


class Tied(nn.Module):
    """Embedding → Conv1d → Conv2d → Linear, plus an output layer tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv1 = nn.Conv1d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.circular = nn.Conv1d(6, 6, 3, padding=1, padding_mode="circular")
        self.proj = nn.Linear(12, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)  # [B, 6, T]
        h = torch.relu(self.conv1(h) + self.circular(h))
        h = self.conv2(h[:, None]).flatten(1, 2).mean(-1)  # [B, 12]
        return self.out(torch.tanh(self.proj(h)))


def test_embeddings_tied_outputs_and_unsupported_convs_are_dropped_convs_are_scored():
    torch.manual_seed(0)
    model = Tied().eval()
    ids, y = torch.randint(0, 11, (8, 5)), torch.randint(0, 11, (8,))
    report = select_layer(model, (ids, y), loss="cross_entropy", num_perturbations=64)
    assert {s.name for s in report.scores} == {"conv1", "conv2", "proj"}
    assert report.dropped == {
        "emb": "input embedding",
        "circular": "unsupported layer type Conv1d, padding_mode='circular'",
        "out": "tied to an input embedding (shares its weight)",
    }


def test_transformers_conv1d_and_dict_batches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (4, 6))

    def next_token_loss(logits, labels):
        return (
            nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
            .view(labels.shape[0], -1)
            .mean(1)
        )

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    report = select_layer(model, batch, loss=next_token_loss, num_perturbations=16, layer=None)
    names = {s.name for s in report.scores}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= names
    assert report.dropped["lm_head"].startswith("tied to an input embedding")
    assert report.dropped["transformer.wte"] == "input embedding"


def test_bert_pooler_without_gradient_path_is_never_a_candidate():
    # As in all-MiniLM-L6-v2: the output is the token states, so pooler.dense never reaches the loss.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 30, (3, 5))

    def embedding_loss(hidden, target):
        return (hidden.mean(1) - target).pow(2).mean(1)

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randn(3, 8)}
    report = select_layer(model, batch, loss=embedding_loss, num_perturbations=8)
    assert report.dropped["pooler.dense"] == "no gradient path to the loss"
    assert "pooler.dense" not in {s.name for s in report.scores} and len(report.scores) == 6


def test_report_markdown_dict_and_plot(toy, tmp_path):
    report = select_layer(toy, toy_batch(), loss="mse", num_perturbations=K)
    md = report.to_markdown()
    assert "| 1 | big | Linear 3×4 | 12 |" in md and "Winner: **big**; runner-up: small." in md
    assert "- unused: no gradient path to the loss" in md
    d = report.to_dict()
    assert d["winner"] == "big" and d["scores"][0]["shape"] == [3, 4] and d["dropped"]["unused"]
    png = report.plot(tmp_path / "scores.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(toy, tmp_path, monkeypatch):
    report = select_layer(toy, toy_batch(), loss="mse", num_perturbations=16, layer="small")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"ocd_hf\[plot\]"):
        report.plot(tmp_path / "x.png")


def test_dataset_selection_data_uses_the_first_samples(toy):
    x, y = toy_batch(40)
    a = select_layer(toy, TensorDataset(x, y), loss="mse", num_perturbations=32, max_samples=10)
    b = select_layer(toy, (x[:10], y[:10]), loss="mse", num_perturbations=32)
    assert a.num_samples == 10 and [s.score for s in a.scores] == [s.score for s in b.scores]


def test_wrapper_auto_with_selection_data_stores_the_resolved_name(toy):
    ocd = OCDWrapper.from_pretrained(
        toy, layer="auto", selection_data=toy_batch(), loss="mse", selection_kwargs={"num_perturbations": K}
    )
    assert ocd.config.layer == "big" and ocd.layer is toy.big
    assert ocd.selection_report.winner == "big" and ocd.selection_report.runner_up == "small"
    assert ocd.state.selection["winner"] == "big"
    assert '"layer": "big"' in ocd.config.to_json_string()


def test_wrapper_auto_list_restricts_and_auto_without_data_defers_to_collect(toy, tmp_path):
    ocd = OCDWrapper.from_pretrained(
        toy,
        layer=["small", "zeroed"],
        selection_data=toy_batch(),
        loss="mse",
        selection_kwargs={"num_perturbations": 32},
    )
    assert ocd.config.layer == "small" and ocd.selection_report.dropped == {
        "zeroed": "zero gradient on the selection batch"
    }

    deferred = OCDWrapper.from_pretrained(toy, layer="auto", selection_kwargs={"num_perturbations": 32})
    assert deferred.layer is None and deferred.config.layer == "auto" and deferred.selection_report is None
    x, y = toy_batch(20)
    store = deferred.collect(TensorDataset(x, y), loss="mse", collect_dir=tmp_path / "c", progress=False)
    assert deferred.config.layer == "big" and deferred.selection_report.num_samples == 20
    assert len(store) == 20 and tuple(store.weight_shape) == (3, 4)

    with pytest.raises(ValueError, match="selection_data needs layer='auto'"):
        OCDWrapper.from_pretrained(toy, layer="big", selection_data=toy_batch(), loss="mse")


def test_selection_data_as_rows_or_hf_dataset():
    """A list of rows and a Hugging Face `datasets.Dataset` are datasets, not one batch."""
    import datasets

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    net = Net()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    rows = [(x[i], y[i]) for i in range(12)]
    from ocd_hf import select_layer

    r_rows = select_layer(net, rows, loss="cross_entropy", num_perturbations=50)
    r_batch = select_layer(net, (x, y), loss="cross_entropy", num_perturbations=50)
    scores = lambda r: {s.name: s.score for s in r.scores}  # noqa: E731
    assert scores(r_rows) == scores(r_batch)
    ds = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")
    r_hf = select_layer(net, ds, loss="cross_entropy", num_perturbations=50)
    assert r_hf.winner == r_batch.winner
    for k, v in scores(r_batch).items():
        assert abs(scores(r_hf)[k] - v) < 1e-3


# ---------------------------------------------------------------------------------------------- screening
class Mixed(nn.Module):
    """Every layer kind the screening handles: a Linear on tokens called twice, a strided grouped Conv2d,
    a Conv1d with padding="same" and a transformers Conv1D."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.conv1 = nn.Conv1d(6, 5, 3, padding="same", dilation=2)
        self.tok = nn.Linear(5, 5)
        self.hf = Conv1D(3, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(x)).flatten(2)  # [B, 6, 16]
        h = self.conv1(h).transpose(1, 2)  # [B, 16, 5]
        h = self.tok(torch.tanh(self.tok(h)))  # the same weight twice
        return self.hf(h).mean(1)


def test_per_sample_grad_norms_match_a_loop_over_samples():
    from ocd_hf.losses import cross_entropy
    from ocd_hf.screening import per_sample_grad_norms

    torch.manual_seed(0)
    model = Mixed().double().eval()
    x, y = torch.randn(5, 4, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    layers = {n: model.get_submodule(n) for n in ("conv2", "conv1", "tok", "hf")}
    screen = per_sample_grad_norms(lambda: cross_entropy(model(x), y), layers, 5)
    for name, layer in layers.items():
        expected = torch.stack(
            [
                torch.autograd.grad(cross_entropy(model(x[i : i + 1]), y[i : i + 1]).sum(), layer.weight)[0].norm()
                for i in range(5)
            ]
        )
        torch.testing.assert_close(screen.grad_norms[name], expected, rtol=1e-9, atol=1e-12)
    assert all(not w.requires_grad or w.grad is None for w in model.parameters())


def _digits_models():
    from ocd_hf.demo import LeNetDigits, load_digits_split, train_base

    train, _ = load_digits_split(0)
    torch.manual_seed(0)
    lenet = train_base(LeNetDigits(), train, epochs=30, seed=0).eval()
    x, y = train.tensors[0][:32], train.tensors[1][:32]
    flat = train.tensors[0].flatten(1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(flat.shape[1], 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(mlp.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(flat), train.tensors[1]).backward()
        opt.step()
    return [(lenet.eval(), (x, y)), (mlp.eval(), (flat[:32], y))]


def test_screening_picks_the_full_criterions_winner_on_the_demo_lenet_and_an_mlp():
    for model, batch in _digits_models():
        full = select_layer(model, batch, loss="cross_entropy", num_perturbations=500)
        screened = select_layer(model, batch, loss="cross_entropy", num_perturbations=500, finalists=1)
        assert screened.winner == full.winner
        assert set(screened.screen) == {s.name for s in full.scores} and len(screened.scores) == 1
        # the screening ranks the layers as the full criterion does (docs/selection.md#screening)
        ranked = sorted(screened.screen, key=lambda n: -screened.screen[n])
        assert ranked[:2] == [s.name for s in full.scores][:2]


def test_budget_limits_finalists_and_draws_and_says_so(capsys):
    from ocd_hf.selection import _fit_budget

    per_draw = {"a": 0.01, "b": 0.02, "c": 0.5}
    assert _fit_budget(["a", "b", "c"], per_draw, 100.0, 1000, 32) == (["a", "b", "c"], 188)
    assert _fit_budget(["a", "b", "c"], per_draw, 3.0, 1000, 32) == (["a", "b"], 100)
    assert _fit_budget(["c", "a"], per_draw, 1.0, 1000, 32) == (["c"], 32)  # the best one always, at least 32 draws
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    report = select_layer(mlp, batch, "cross_entropy", finalists=2, budget_s=60.0, num_perturbations=64, progress=True)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "screening every candidate layer" in text and "full Eq. 6 on the best 2 of 3" in text and "about" in text
    assert len(report.scores) == 2 and set(report.screen) == {"0", "2", "4"} and report.num_perturbations == 64
    assert report.summary()["finalists"] == [s.name for s in report.scores]
    with pytest.raises(ValueError, match="budget_s must be > 0"):
        select_layer(mlp, batch, "cross_entropy", budget_s=0)


def test_wrapper_auto_screens_by_default_and_selection_kwargs_change_it():
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    auto = OCDWrapper.from_pretrained(mlp.eval(), layer="auto", selection_data=batch, loss="cross_entropy")
    assert len(auto.selection_report.screen) == 4 and len(auto.selection_report.scores) <= 3
    full = OCDWrapper.from_pretrained(
        mlp,
        layer="auto",
        selection_data=batch,
        loss="cross_entropy",
        selection_kwargs={"finalists": None, "budget_s": None, "num_perturbations": 64},
    )
    assert full.selection_report.screen == {} and len(full.selection_report.scores) == 4


def test_auto_warns_when_it_chooses_a_layer_too_large_for_a_full_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 400), nn.ReLU(), nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 2)).eval()
    batch = (torch.randn(6, 8), torch.randint(0, 2, (6,)))
    kw = dict(layer=["2"], selection_data=batch, loss="cross_entropy", selection_kwargs={"num_perturbations": 4})
    with pytest.warns(UserWarning, match=r"chose '2' \(Linear \(300, 400\), 120,000 weights\).*target='factored'"):
        OCDWrapper.from_pretrained(model, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a factored head is cheap: no warning
        OCDWrapper.from_pretrained(model, target="factored", **kw)
