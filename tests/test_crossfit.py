"""Held-out (cross-fitted) collection, delta_scale calibration and sampling health checks."""

import copy
import warnings

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, SmallCNN
from torch.utils.data import TensorDataset

from ocd_hf import OCDTrainingArguments, OCDWrapper
from ocd_hf.calibration import choose_scale
from ocd_hf.collection import DeltaStore
from ocd_hf.config import ConfigError
from ocd_hf.health import check_samples
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import overfit_batch


def _data(n=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


def _train(ds, seed=0, steps=20):
    torch.manual_seed(seed)
    m = SmallCNN()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.stack([ds[i][1] for i in range(len(ds))])
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(xs), ys).backward()
        opt.step()
    return m.eval()


def test_cross_fit_collects_out_of_fold_deltas(tmp_path):
    data = _data()
    model = _train(data)
    before = copy.deepcopy(model.state_dict())
    seen: list[list[int]] = []
    fold_models = []

    def train_fn(subset):
        seen.append(list(subset.indices))
        fold_models.append(_train(subset, seed=len(seen)))
        return fold_models[-1]

    ocd = OCDWrapper.from_pretrained(model, layer="fc1", **TINY_HEAD)
    store = ocd.collect(
        data, "cross_entropy", collect_dir=tmp_path, cross_fit=train_fn, num_folds=3, batch_size=8, progress=False
    )
    assert len(store) == 30 and len(seen) == 3
    folds = [sorted(set(range(30)) - set(s)) for s in seen]
    assert sorted(i for f in folds for i in f) == list(range(30))  # each sample is out-of-fold exactly once
    # the wrapped model is back to its own weights
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    # fold k's rows are the deltas of fold k's model on fold k's samples (it never saw them)
    offset = 0
    for k, fold in enumerate(folds):
        m = fold_models[k]
        xs = torch.stack([data[i][0] for i in fold])
        ys = torch.stack([data[i][1] for i in fold])
        ref = overfit_batch(m, m.fc1, xs, ys, cross_entropy, steps=3, lr=5e-4)
        rows = store.get_batch(range(offset, offset + len(fold)))
        torch.testing.assert_close(rows["delta"], ref.delta, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rows["layer_input"], ref.layer_input, atol=1e-6, rtol=1e-5)
        offset += len(fold)
    assert ocd.state.collection == {"mode": "cross_fit", "num_folds": 3}
    # resume: finished folds are not retrained
    again = ocd.collect(data, "cross_entropy", collect_dir=tmp_path, cross_fit=train_fn, num_folds=3, progress=False)
    assert len(seen) == 3 and len(again) == 30


def test_cross_fit_rejects_bad_fold_count(tmp_path):
    ocd = OCDWrapper.from_pretrained(SmallCNN(), layer="fc1", **TINY_HEAD)
    with pytest.raises(ValueError, match="num_folds=1 is out of range"):
        ocd.collect(
            _data(6), "cross_entropy", collect_dir=tmp_path, cross_fit=lambda d: SmallCNN(), num_folds=1, progress=False
        )
    with pytest.raises(ValueError, match=r"num_folds must be between 2 and the dataset size \(6\); got 7"):
        ocd.collect(
            _data(6), "cross_entropy", collect_dir=tmp_path, cross_fit=lambda d: SmallCNN(), num_folds=7, progress=False
        )


def test_delta_store_reads_folders_as_one_and_refuses_mixed_settings(tmp_path):
    model = _train(_data())
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", **TINY_HEAD)
    a = ocd.collect(_data(10, 2), "cross_entropy", collect_dir=tmp_path / "a", progress=False)
    b = ocd.collect(_data(7, 3), "cross_entropy", collect_dir=tmp_path / "b", progress=False)
    both = DeltaStore([tmp_path / "a", tmp_path / "b"])
    assert len(both) == 17
    torch.testing.assert_close(both.get_batch([12])["delta"], b.get_batch([2])["delta"], atol=0, rtol=0)
    torch.testing.assert_close(both.column("scale"), torch.cat([a.column("scale"), b.column("scale")]), atol=0, rtol=0)
    other = OCDWrapper.from_pretrained(model, layer="fc1", overfit_steps=2, **TINY_HEAD)
    other.collect(_data(5, 4), "cross_entropy", collect_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="different settings"):
        DeltaStore([tmp_path / "a", tmp_path / "c"])


@pytest.fixture(scope="module")
def fitted():
    data = _data(48)
    model = _train(data)
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", **TINY_HEAD)
    ocd.fit(data, loss="cross_entropy", batch_size=16, num_train_steps=10, **TINY_TRAIN)
    return ocd, _data(40, seed=7)


def test_calibrate_switches_off_a_head_that_does_not_help(fitted):
    ocd, val = fitted
    ocd = copy.deepcopy(ocd)
    # a head whose deltas push every sample away from its label: any delta_scale > 0 hurts
    bad = -_oracle(ocd, val)[None] * 50
    ocd.generate_deltas = lambda cond, num_samples=1, generator=None, delta_scale=None: bad
    res = ocd.calibrate(val, batch_size=64, progress=False)
    assert res["delta_scale"] == 0.0 and ocd.delta_scale == 0.0
    assert all(res["mean_loss"][k] > res["mean_loss"]["0.0"] for k in res["mean_loss"] if k != "0.0")


def test_calibrate_keeps_a_head_that_helps(fitted):
    ocd, val = fitted
    ocd = copy.deepcopy(ocd)
    # deltas that overfit each validation sample's own label help beyond noise
    good = _oracle(ocd, val)[None]
    ocd.generate_deltas = lambda cond, num_samples=1, generator=None, delta_scale=None: good
    res = ocd.calibrate(val, batch_size=64, progress=False)
    assert res["delta_scale"] > 0 and res["gain_vs_base"] > 2 * res["gain_se"]
    assert ocd.state.calibration["delta_scale"] == res["delta_scale"]


def _oracle(ocd, ds):
    return overfit_batch(ocd.module, ocd.layer, ds.tensors[0], ds.tensors[1], cross_entropy, steps=3, lr=5e-2).delta


def test_delta_scale_scales_generated_deltas(fitted):
    ocd, val = fitted
    x = val.tensors[0][:4]
    cond, _ = ocd.conditioning(x)
    d1 = ocd.generate_deltas(cond, 1, torch.Generator().manual_seed(0))
    half = copy.copy(ocd)
    half.delta_scale = 0.5
    d2 = half.generate_deltas(cond, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d2, 0.5 * d1)
    # a per-call override gives the uncalibrated deltas whatever the config says
    torch.testing.assert_close(half.generate_deltas(cond, 1, torch.Generator().manual_seed(0), delta_scale=1.0), d1)
    off = copy.copy(ocd)
    off.delta_scale = 0.0
    base = ocd.module(x)
    torch.testing.assert_close(off(x), base)


def test_health_check_warns_and_raises():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = check_samples(torch.randn(64, 100, generator=torch.Generator().manual_seed(0)), 1.0)
    assert h.ok and abs(h.ratio - 1) < 0.05
    with pytest.warns(RuntimeWarning, match="leave the training range"):
        assert not check_samples(torch.randn(64, 100) * 60, 1.0).ok
    with pytest.warns(RuntimeWarning, match="leave the training range"):
        assert not check_samples(torch.randn(64, 100) * 0.1, 1.0).ok
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        check_samples(bad, 1.0)


def _per_sample(gains_and_noise, n=400, seed=0):
    """Per-sample losses whose paired difference to base has the given mean and spread per grid value."""
    g = torch.Generator().manual_seed(seed)
    base = 1.0 + torch.rand(n, generator=g, dtype=torch.float64)
    per = {0.0: base}
    for scale, (gain, noise) in gains_and_noise.items():
        z = torch.randn(n, generator=g, dtype=torch.float64)
        per[scale] = base - gain + noise * (z - z.mean()) / z.std()
    return per


def test_choose_scale_rules_against_hand_computed_standard_errors():
    # SE of the paired difference is noise / sqrt(400) = noise / 20: value 2.0 gains 0.03 at SE 0.02 (1.5 SE),
    # value 1.0 gains 0.02 at SE 0.005 (4 SE)
    per = _per_sample({1.0: (0.02, 0.1), 2.0: (0.03, 0.4)})
    se2 = choose_scale(per, rule="se", min_gain_se=2.0)
    assert se2["best"] == 2.0 and se2["gain_se"] == pytest.approx(0.02) and se2["delta_scale"] == 0.0
    assert choose_scale(per, rule="se", min_gain_se=1.0)["delta_scale"] == 2.0
    # shrunk gains: 1.0 -> 0.02 - 0.005 = 0.015, 2.0 -> 0.03 - 0.02 = 0.01
    assert choose_scale(per, rule="shrinkage", min_gain_se=1.0)["delta_scale"] == 1.0
    assert choose_scale(per, rule="shrinkage", min_gain_se=5.0)["delta_scale"] == 0.0
    with pytest.raises(ValueError, match="rule 'median' is unknown"):
        choose_scale(per, rule="median")


def test_calibration_rule_is_a_validated_training_argument(fitted):
    with pytest.raises(ConfigError, match="calibration_rule"):
        OCDTrainingArguments(calibration_rule="median")
    assert max(OCDTrainingArguments().calibration_grid) > 2.0
    ocd, val = fitted
    ocd = copy.deepcopy(ocd)
    res = ocd.calibrate(val, batch_size=64, progress=False, calibration_rule="shrinkage", min_gain_se=1.0)
    assert res["rule"] == "shrinkage" and res["min_gain_se"] == 1.0
    assert ocd.state.calibration["rule"] == "shrinkage"


def test_calibration_rules_benchmark_quick(capsys):
    from benchmarks.calibration_rules import RULES, main

    out = main(["--quick", "--seeds", "0"])
    names = set(RULES) | {"uncalibrated (delta_scale 1)"}
    assert set(out["ocd"]) == names and set(out["rival"]) == names
    assert {"base", "predicted-label rival"} <= set(out["evaluate"][0]["rows"])
    for method in ("ocd", "rival"):
        for row in out[method].values():
            (scale,), (gain,) = row["chosen"], row["gains"]
            assert scale in out["grid"] and row["regressions"] == int(gain < 0)
            if scale == 0.0:
                assert gain == 0.0
        assert out[method]["se2, grid <= 2"]["chosen"][0] <= 2.0
    assert "| se2 (default) |" in capsys.readouterr().out
