"""The predicted-label rival: overfitting toward the base model's own prediction, against slow references."""

import copy
import json
import warnings

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, SmallCNN
from torch.utils.data import TensorDataset

from ocd_hf import OCDWrapper
from ocd_hf.calibration import choose_scale
from ocd_hf.evaluation import Cosine, Group, Row, evaluate, predicted_label_deltas
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_batch, overfit_sequential


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    # labels a trained SmallCNN can mostly predict, so that both correct and wrong samples occur
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def fitted():
    train, val, test = _data(48, 1), _data(24, 2), _data(20, 3)
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train.tensors[0]), train.tensors[1]).backward()
        opt.step()
    model.eval()
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", overfit_lr=5e-2, **TINY_HEAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncalibrated, barely trained: only the rival is under test
        ocd.fit(train, loss="cross_entropy", num_train_steps=5, **TINY_TRAIN)
    return ocd, val, test


def _slow_outputs(ocd, x, labels, scale=1.0):
    """Per sample: deepcopy the model, overfit fc1 toward `labels`, add `scale` x the delta, run it."""
    c = ocd.config
    deltas = overfit_sequential(
        ocd.module,
        "fc1",
        x,
        labels,
        cross_entropy,
        steps=c.overfit_steps,
        lr=c.overfit_lr,
        optimizer=c.overfit_optimizer,
    )
    outs = []
    for b in range(len(x)):
        m = copy.deepcopy(ocd.module).eval()
        with torch.no_grad():
            m.fc1.weight += scale * deltas[b]
            outs.append(m(x[b : b + 1]))
    return torch.cat(outs)


def test_predicted_label_rows_match_a_per_sample_loop(fitted):
    ocd, val, test = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the 5-step head's samples are off-range
        r = evaluate(ocd, test, num_samples=2, validation=val, batch_size=8, progress=False)
    x, y = test.tensors
    with torch.no_grad():
        pred = ocd.module(x).argmax(-1)
    slow = cross_entropy(_slow_outputs(ocd, x, pred), y).mean()
    assert r.rows[Row.PREDICTED_LABEL]["cross_entropy"] == pytest.approx(float(slow), rel=1e-5)
    # the calibrated row: the grid scored on validation with the per-sample loop, the same rule applied
    vx, vy = val.tensors
    with torch.no_grad():
        vpred = ocd.module(vx).argmax(-1)
    rec = r.extra["predicted_label_calibration"]
    grid = [float(g) for g in rec["mean_loss"]]
    per = {g: cross_entropy(_slow_outputs(ocd, vx, vpred, g), vy).double() for g in grid}
    ref = choose_scale(per, rule=rec["rule"], min_gain_se=rec["min_gain_se"])
    assert ref["delta_scale"] == r.extra["predicted_label_delta_scale"]
    for g in grid:
        assert rec["mean_loss"][str(g)] == pytest.approx(ref["mean_loss"][str(g)], rel=1e-5)
    calibrated = cross_entropy(_slow_outputs(ocd, x, pred, ref["delta_scale"]), y).mean()
    assert r.rows[Row.PREDICTED_LABEL_CALIBRATED]["cross_entropy"] == pytest.approx(float(calibrated), rel=1e-5)
    assert r.extra["predicted_label_ms_per_sample"] > 0 and r.extra["ocd_ms_per_sample"] > 0
    assert Cosine.PREDICTED_LABEL in r.cosine_to_oracle


def test_predicted_label_delta_equals_the_true_label_delta_on_correct_samples(fitted):
    ocd, _, test = fitted
    x, y = test.tensors
    with torch.no_grad():
        out = ocd.module(x)
    correct = out.argmax(-1) == y
    assert 0 < int(correct.sum()) < len(y), "the fixture should give both correct and wrong samples"
    c = ocd.config
    rival = predicted_label_deltas(ocd, x, out)
    oracle = overfit_batch(ocd.module, ocd.layer, x, y, cross_entropy, steps=c.overfit_steps, lr=c.overfit_lr).delta
    assert torch.equal(rival[correct], oracle[correct])  # bit for bit
    assert not torch.equal(rival[~correct], oracle[~correct])


def test_without_validation_only_the_uncalibrated_rival_row(fitted):
    ocd, _, test = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = evaluate(ocd, test, num_samples=1, progress=False)
    assert Row.PREDICTED_LABEL in r.rows and Row.PREDICTED_LABEL_CALIBRATED not in r.rows


def test_few_step_rows(fitted):
    ocd, _, test = fitted
    steps = ocd.config.num_inference_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = evaluate(ocd, test, num_samples=1, inference_steps=(1, steps), progress=False)
    # the config's own step count with the same seed is the OCD row itself
    assert r.rows[Row.ddim_steps(steps)]["cross_entropy"] == pytest.approx(r.rows[Row.OCD]["cross_entropy"], rel=1e-6)
    assert r.rows[Row.ddim_steps(1)] != r.rows[Row.OCD]
    assert r.cosine_to_oracle[Cosine.ddim_steps(steps)] == pytest.approx(r.cosine_to_oracle[Cosine.OCD], rel=1e-6)
    assert set(r.extra["sampler_ms_per_sample"]) == {Row.ddim_steps(1), Row.ddim_steps(steps)}
    assert Row.DISTILLED not in r.rows  # the head has no student


def test_distilled_row_is_the_students_draw(fitted):
    ocd, val, test = fitted
    ocd = copy.deepcopy(ocd)
    ocd.distill(val, num_steps=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        student = evaluate(ocd, test, num_samples=1, progress=False)
        ocd.config = ocd.config.replace(sampler="ddim")
        teacher = evaluate(ocd, test, num_samples=1, progress=False)
    # with the student as the sampler, the OCD row is the distilled row's draw (same seed); the teacher's differs
    assert student.rows[Row.DISTILLED] == pytest.approx(student.rows[Row.OCD], rel=1e-6)
    assert teacher.rows[Row.DISTILLED] == pytest.approx(student.rows[Row.DISTILLED], rel=1e-6)
    assert teacher.rows[Row.OCD] != teacher.rows[Row.DISTILLED]
    assert Row.DISTILLED in teacher.extra["sampler_ms_per_sample"]


def _hand_margin(logits, labels):
    """The true-class margin by a loop over classes."""
    out = []
    for z, y in zip(logits.tolist(), labels.tolist()):
        out.append(z[y] - max(v for k, v in enumerate(z) if k != y))
    return torch.tensor(out, dtype=torch.float64)


def _group_stats(change):
    n = len(change)
    mean = sum(change.tolist()) / n
    var = sum((c - mean) ** 2 for c in change.tolist()) / (n - 1)
    return n, mean, (var / n) ** 0.5


def test_margin_diagnostic_matches_a_per_sample_loop(fitted):
    ocd, val, test = fitted
    x, y = test.tensors
    old_scale = ocd.delta_scale
    ocd.delta_scale = 0.5  # a nonzero scale, so that OCD's draw moves the margins
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = evaluate(ocd, test, num_samples=2, validation=val, batch_size=64, seed=3, progress=False)
            # OCD's first draw: the same generator and call as the evaluation's single batch
            cond, _ = ocd.conditioning(x)
            raw = ocd.generate_deltas(cond, 2, torch.Generator().manual_seed(3), delta_scale=1.0)[0]
        ocd_out = {0.5: [], 1.0: []}
        for b in range(len(x)):
            for scale, outs in ocd_out.items():
                m = copy.deepcopy(ocd.module).eval()
                with torch.no_grad():
                    m.fc1.weight += scale * raw[b]
                    outs.append(m(x[b : b + 1]))
    finally:
        ocd.delta_scale = old_scale
    with torch.no_grad():
        base = ocd.module(x)
    pred = base.argmax(-1)
    correct = pred == y
    assert 0 < int(correct.sum()) < len(y)
    outs = {
        Row.ORACLE: _slow_outputs(ocd, x, y),
        Row.OCD: torch.cat(ocd_out[0.5]),
        Row.OCD_UNCALIBRATED: torch.cat(ocd_out[1.0]),
        Row.PREDICTED_LABEL: _slow_outputs(ocd, x, pred),
        Row.PREDICTED_LABEL_CALIBRATED: _slow_outputs(ocd, x, pred, r.extra["predicted_label_delta_scale"]),
    }
    assert set(r.margins) == set(outs)
    assert r.margins[Row.OCD][Group.CORRECT]["mean_change"] != 0
    base_margin = _hand_margin(base, y)
    for row, out in outs.items():
        change = _hand_margin(out, y) - base_margin
        for group, mask in ((Group.CORRECT, correct), (Group.WRONG, ~correct)):
            n, mean, se = _group_stats(change[mask])
            got = r.margins[row][group]
            assert got["n"] == n, (row, group)
            assert got["mean_change"] == pytest.approx(mean, rel=1e-4, abs=1e-6), (row, group)
            assert got["se"] == pytest.approx(se, rel=1e-3, abs=1e-6), (row, group)
            assert got["base_margin"] == pytest.approx(sum(base_margin[mask].tolist()) / n, rel=1e-5)
    # the oracle raises every margin; the rival's change on correct samples is the oracle's
    assert r.margins[Row.ORACLE][Group.WRONG]["mean_change"] > 0
    assert r.margins[Row.PREDICTED_LABEL][Group.CORRECT]["mean_change"] == pytest.approx(
        r.margins[Row.ORACLE][Group.CORRECT]["mean_change"], rel=1e-6
    )
    assert r.margins[Row.PREDICTED_LABEL][Group.WRONG]["mean_change"] < 0
    assert json.loads(json.dumps(r.to_dict()))["margins"] == r.margins
    assert "true-class margin" in r.to_markdown()
