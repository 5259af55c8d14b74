"""The evaluation's metrics, baselines and ablation rows."""

import copy

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, SmallCNN
from torch.utils.data import TensorDataset

from ocd_hf import OCDWrapper
from ocd_hf.evaluation import Cosine, Row, compute_metrics, evaluate, expected_calibration_error, fit_temperature
from ocd_hf.losses import cross_entropy
from ocd_hf.margins import Group, MarginMeter, true_class_margin
from ocd_hf.overfit import make_optimizer, overfit_all_layers, take


def test_ece_matches_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=g)
    hit = (torch.rand(500, generator=g) < conf**2).float()
    slow = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        sel = [i for i in range(500) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if sel:
            slow += len(sel) / 500 * abs(hit[sel].mean() - conf[sel].mean()).item()
    assert expected_calibration_error(conf, hit, bins=10) == pytest.approx(slow, abs=1e-6)
    assert expected_calibration_error(torch.ones(4), torch.ones(4)) == pytest.approx(0.0)


def test_compute_metrics_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    m = compute_metrics(logits, labels, "classification")
    assert set(m) == {"cross_entropy", "accuracy", "ece"}
    assert m["cross_entropy"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    conf = logits.softmax(-1).max(-1).values
    assert m["ece"] == pytest.approx(expected_calibration_error(conf, (logits.argmax(1) == labels).float()), abs=1e-6)
    out, target = torch.randn(30, 1, generator=g), torch.randn(30, 1, generator=g)
    assert compute_metrics(out, target, "regression") == {
        "rmse": pytest.approx(float((out - target).pow(2).mean().sqrt()), rel=1e-6)
    }


def test_temperature_recovers_the_generating_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=g) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=g).squeeze(1)
    t = fit_temperature(true_logits * 3.0, labels)  # over-confident by 3x
    assert t == pytest.approx(3.0, rel=0.1)


def test_all_layers_oracle_equals_a_deepcopy_loop():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 5, (5,), generator=g)
    before = copy.deepcopy(model.state_dict())
    out = overfit_all_layers(model, x, y, cross_entropy, steps=3, lr=1e-2)
    ref = []
    for b in range(5):
        m = copy.deepcopy(model).eval()
        opt = make_optimizer(list(m.parameters()), "adam", 1e-2)
        for _ in range(3):
            opt.zero_grad()
            cross_entropy(m(x[b : b + 1]), y[b : b + 1]).sum().backward()
            opt.step()
        ref.append(m(x[b : b + 1]).detach())
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert cross_entropy(out, y).mean() < cross_entropy(model(x), y).mean()


def test_take_slices_nested_batches():
    batch = {"a": torch.arange(6).reshape(3, 2), "b": [torch.arange(3), torch.zeros(3, 1)]}
    one = take(batch, 1)
    assert one["a"].tolist() == [[2, 3]] and one["b"][0].tolist() == [1]
    assert take(["x", "y", "z"], 2) == ["z"]


def test_evaluate_reports_every_row(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g))
    train, val, test = (torch.utils.data.Subset(data, r) for r in (range(32), range(32, 48), range(48, 64)))
    torch.manual_seed(0)
    model = SmallCNN().eval()
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", **TINY_HEAD)
    store = ocd.collect(train, "cross_entropy", collect_dir=tmp_path / "c", progress=False)
    ocd.train_head(store, num_train_steps=5, **TINY_TRAIN)
    ocd.delta_scale = 0.5
    alt = OCDWrapper.from_pretrained(model, layer="fc2", **TINY_HEAD).fit(
        train, "cross_entropy", num_train_steps=5, **TINY_TRAIN
    )
    r = evaluate(
        ocd,
        test,
        num_samples=3,
        validation=val,
        train=train,
        collection=store,
        alternative=alt,
        oracle_all_layers=True,
        progress=False,
    )
    expected = {
        "base",
        "base + temperature scaling",
        "kNN in i_L space",
        "oracle, this layer (test label)",
        "oracle, all layers (test label)",
        "OCD",
        "OCD x3",
        "OCD mean-weights x3",
        "OCD at delta_scale 1",
        "nearest-neighbour delta",
        "no-scale ablation (mean training ρ)",
        "mean-delta control",
        "OCD on fc2",
        "predicted-label rival",
        "predicted-label rival, calibrated",
    }
    assert set(r.rows) == expected
    # the constants name exactly these rows (the strings above are what reports and docs show)
    assert expected == {
        Row.BASE,
        Row.TEMPERATURE,
        Row.KNN,
        Row.ORACLE,
        Row.ORACLE_ALL_LAYERS,
        Row.OCD,
        Row.ensemble(3),
        Row.mean_weights(3),
        Row.OCD_UNCALIBRATED,
        Row.NEAREST_NEIGHBOUR,
        Row.NO_SCALE,
        Row.MEAN_DELTA,
        Row.alternative("fc2"),
        Row.PREDICTED_LABEL,
        Row.PREDICTED_LABEL_CALIBRATED,
    }
    assert all(set(v) == {"cross_entropy", "accuracy", "ece"} for v in r.rows.values())
    assert set(r.cosine_to_oracle) == {
        "OCD (1 draw)",
        "nearest-neighbour delta",
        "mean training delta",
        "predicted-label rival",
    }
    assert set(r.cosine_to_oracle) == {Cosine.OCD, Cosine.NEAREST_NEIGHBOUR, Cosine.MEAN_DELTA, Cosine.PREDICTED_LABEL}
    assert r.health["target_std"] > 0 and r.extra["delta_scale"] == 0.5
    base_ce = cross_entropy(
        model(torch.stack([test[i][0] for i in range(16)])), torch.stack([test[i][1] for i in range(16)])
    ).mean()
    assert r.rows["base"]["cross_entropy"] == pytest.approx(float(base_ce), rel=1e-5)
    assert r.rows["oracle, all layers (test label)"]["cross_entropy"] < r.rows["base"]["cross_entropy"]
    assert "| OCD on fc2 |" in r.to_markdown()


def test_true_class_margin_and_the_meter_by_hand():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [1.0, 1.0, 4.0], [0.0, -2.0, 1.0]])
    labels = torch.tensor([0, 0, 2, 1])
    assert true_class_margin(logits, labels).tolist() == [1.0, -2.5, 3.0, -3.0]
    meter = MarginMeter()
    meter.add_base(logits, labels)  # correct: samples 0 and 2; wrong: 1 and 3
    moved = logits.clone()
    moved[:, 0] += torch.tensor([1.0, 2.0, 0.0, 0.5])
    meter.add("m", moved, labels)
    # changes: +1 (s0), +2 (s1: 2.5-3.0 = -0.5 vs -2.5), 0 (s2), 0 (s3: max other still 1.0)
    r = meter.result()["m"]
    assert r[Group.CORRECT] == {"n": 2, "base_margin": 2.0, "mean_change": 0.5, "se": pytest.approx(0.5)}
    assert r[Group.WRONG] == {"n": 2, "base_margin": -2.75, "mean_change": 1.0, "se": pytest.approx(1.0)}
    assert MarginMeter().result() == {}


def test_factored_head_on_a_padded_text_model_evaluates(tmp_path):
    """The oracle and the rival of a factored Adam head choose their method by a one-sample probe; inside
    the evaluation's prefix reuse that probe would meet the batch's recorded prefix (an error with padding)."""
    from transformers import BertConfig, BertForSequenceClassification

    from ocd_hf.overfit import overfit_batch

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    model = BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": [2] + torch.randint(3, 50, (int(n),), generator=g).tolist(), "label": i % 3}
        for i, n in enumerate(torch.randint(3, 12, (24,), generator=g))
    ]
    layer = "bert.encoder.layer.1.attention.output.dense"
    ocd = OCDWrapper.from_pretrained(model, layer=layer, target="factored", **TINY_HEAD)
    store = ocd.collect(rows[:12], "cross_entropy", batch_size=6, collect_dir=tmp_path / "c", progress=False)
    ocd.train_head(store, num_train_steps=5, **TINY_TRAIN)
    test = rows[18:]
    r = evaluate(ocd, test, num_samples=1, validation=rows[12:18], batch_size=6, progress=False)
    assert Row.PREDICTED_LABEL_CALIBRATED in r.rows and Row.ORACLE in r.margins
    # the oracle row equals the oracle overfitted outside any prefix reuse
    batch = ocd.adapter.collate_fn()(test)
    inputs, labels = ocd.adapter.split_batch(batch)
    c = ocd.config
    oracle = overfit_batch(
        ocd.module,
        ocd.layer,
        inputs,
        labels,
        cross_entropy,
        ocd.adapter.forward,
        c.overfit_steps,
        c.overfit_lr,
        target="factored",
    ).delta
    out = ocd.forward_with_deltas(inputs, oracle)
    assert r.rows[Row.ORACLE]["cross_entropy"] == pytest.approx(float(cross_entropy(out, labels).mean()), rel=1e-5)
