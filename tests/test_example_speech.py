"""Speech separation task (benchmarks/task_speech.py): SI-SDR and PIT against slow references, the synthetic
mixtures, per-sample weights on the separator's 1x1 projection, and the example's --quick run."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.task_speech import (
    TasNet,
    align,
    ensemble_waveforms,
    make_mixtures,
    pit_loss,
    pit_si_sdr,
    si_sdr,
)

ROOT = Path(__file__).resolve().parents[1]


def slow_si_sdr(est: np.ndarray, ref: np.ndarray) -> float:
    """SI-SDR of one pair, written out in float64 from its definition."""
    est, ref = est - est.mean(), ref - ref.mean()
    target = (est @ ref) / (ref @ ref) * ref
    noise = est - target
    return 10 * math.log10((target @ target) / (noise @ noise))


def test_si_sdr_known_values():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=g, dtype=torch.float64)
    noise = torch.randn(1000, generator=g, dtype=torch.float64)
    ref, noise = ref - ref.mean(), noise - noise.mean()
    noise = noise - (noise @ ref) / (ref @ ref) * ref  # orthogonal to the reference
    noise = noise / noise.norm() * ref.norm() * 0.1  # 20 dB below it
    assert float(si_sdr(ref + noise, ref)) == pytest.approx(20.0, abs=1e-6)
    # scale invariance: the estimate's gain and sign do not matter
    assert float(si_sdr(-3.0 * (ref + noise), ref)) == pytest.approx(20.0, abs=1e-6)
    # a scaled copy is perfect up to eps
    assert float(si_sdr(0.5 * ref, ref)) > 60
    # an offset is removed before scoring
    assert float(si_sdr(ref + noise + 7.0, ref)) == pytest.approx(20.0, abs=1e-6)


def test_si_sdr_matches_slow_reference():
    g = torch.Generator().manual_seed(1)
    est, ref = torch.randn(4, 3, 200, generator=g, dtype=torch.float64), torch.randn(4, 3, 200, generator=g)
    got = si_sdr(est, ref.double(), eps=0.0)  # eps shifts very low scores by ~1e-6 dB
    for i in range(4):
        for j in range(3):
            assert float(got[i, j]) == pytest.approx(
                slow_si_sdr(est[i, j].numpy(), ref[i, j].double().numpy()), abs=1e-6
            )


@pytest.mark.parametrize("num_sources", [2, 3, 5])
def test_pit_matches_brute_force(num_sources):
    g = torch.Generator().manual_seed(num_sources)
    ref = torch.randn(3, num_sources, 160, generator=g, dtype=torch.float64)
    est = ref + 0.7 * torch.randn(3, num_sources, 160, generator=g, dtype=torch.float64)
    shuffled = est[:, torch.randperm(num_sources, generator=g)]
    best, perm = pit_si_sdr(shuffled, ref)
    for b in range(3):
        scores = {
            p: np.mean([slow_si_sdr(shuffled[b, p[j]].numpy(), ref[b, j].numpy()) for j in range(num_sources)])
            for p in permutations(range(num_sources))
        }
        want = max(scores, key=scores.get)
        assert float(best[b]) == pytest.approx(scores[want], abs=1e-6)
        assert tuple(perm[b].tolist()) == want
    # align undoes the shuffle
    assert torch.equal(align(shuffled, ref), est)


def test_pit_loss_is_per_sample_and_differentiable():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(4, 300, 3, generator=g)
    out = (target[..., [2, 0, 1]] + 0.1 * torch.randn(4, 300, 3, generator=g)).requires_grad_()
    loss = pit_loss(out, target)
    assert loss.shape == (4,)
    assert bool((loss < -15).all())  # the permuted estimates are found: about 20 dB
    loss.sum().backward()
    assert torch.isfinite(out.grad).all()
    with pytest.raises(ValueError, match="differ"):
        pit_si_sdr(torch.zeros(1, 2, 5), torch.zeros(1, 3, 5))


def test_ensemble_realigns_draws():
    g = torch.Generator().manual_seed(3)
    first = torch.randn(2, 100, 3, generator=g)
    second = first[..., [1, 2, 0]] * 1.0
    torch.testing.assert_close(ensemble_waveforms(torch.stack([first, second])), first)


def test_mixtures_are_deterministic_and_sum():
    a, b, c = make_mixtures(3, 4, 800, seed=5), make_mixtures(3, 4, 800, seed=5), make_mixtures(3, 4, 800, seed=6)
    mix, src = a.tensors
    assert mix.shape == (3, 800) and src.shape == (3, 800, 4)
    assert torch.equal(mix, b.tensors[0]) and torch.equal(src, b.tensors[1])
    assert not torch.equal(mix, c.tensors[0])
    torch.testing.assert_close(src.sum(-1), mix, atol=1e-5, rtol=0)
    torch.testing.assert_close(mix.pow(2).mean(1).sqrt(), torch.ones(3), atol=1e-4, rtol=0)
    assert bool((src.pow(2).mean(1) > 0.01).all())  # no silent source


def test_ocd_weights_on_the_projection_match_a_per_sample_loop():
    from ocd_hf.per_sample import per_sample_weights

    torch.manual_seed(0)
    model = TasNet(3, enc_channels=8, channels=4, hidden=8, num_blocks=2).eval()
    layer = model.get_submodule(model.target_layer)
    assert isinstance(layer, torch.nn.Conv1d) and layer.kernel_size == (1,)
    mix = torch.randn(3, 400)
    delta = 0.1 * torch.randn(3, *layer.weight.shape)
    with torch.no_grad(), per_sample_weights(layer, delta):
        batched = model(mix)
    assert batched.shape == (3, 400, 3)
    w = layer.weight.data.clone()
    for b in range(3):
        layer.weight.data = w + delta[b]
        with torch.no_grad():
            torch.testing.assert_close(batched[b], model(mix[b : b + 1])[0], atol=1e-5, rtol=1e-5)
    layer.weight.data = w


def test_example_quick_runs(capsys):
    spec = importlib.util.spec_from_file_location(
        "speech_separation_ocd", ROOT / "examples" / "speech_separation_ocd.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--quick"])
    out = capsys.readouterr().out
    for row in ("| base |", "| oracle, this layer (test label) |", "| OCD |", "| OCD x5 |", "| no-scale ablation"):
        assert row in out, row
    assert "delta_scale" in out and "total" in out
    assert "nan" not in out.lower().split("cosine")[0]


def test_benchmark_table_from_records(tmp_path):
    import json

    from benchmarks.task_speech import main

    def record(seed, base, ocd):
        return {
            "seed": seed,
            "rows": {"base": {"si_sdri": base, "si_sdr": base - 6}, "OCD": {"si_sdri": ocd, "si_sdr": ocd - 6}},
            "sizes": {"num_sources": 5, "n_train": 1000},
            "cosine_to_oracle": {},
            "delta_scale": 1.0,
            "times_s": {"data": 1, "base": 2, "ocd_fit": 3, "score": 4},
            "wall_s": 10.0,
        }

    runs = [record(0, 3.0, 3.5), record(1, 4.0, 3.9)]
    runs[1]["rows"]["OCD at delta_scale 1"] = {"si_sdri": 4.25, "si_sdr": -1.75}  # a row only one seed has
    (tmp_path / "speech.json").write_text(json.dumps(runs))
    main(["--render-only", "--out-dir", str(tmp_path)])
    md = (tmp_path / "speech.md").read_text()
    assert "`python -m benchmarks.task_speech --seeds 0 1`" in md
    # mean ± SD of the per-seed gains (+0.5, -0.1), and one seed of two above the base model
    assert "| OCD | 3.7000 ± 0.2828 | -2.3000 ± 0.2828 | +0.2000 ± 0.4243 | 1/2 |" in md
    assert "OCD at delta_scale 1, SI-SDRi (dB), only in some records: seed 1: 4.2500." in md


def test_benchmark_num_sources_saves_and_reuses_runs(tmp_path, monkeypatch):
    import json

    from benchmarks import task_speech

    # smaller than --quick: this test is about the runs' bookkeeping, the quick example covers every step
    tiny = dataclasses.replace(task_speech.QUICK, n_train=16, n_val=8, n_test=8, base_steps=4, ocd_steps=4)
    monkeypatch.setattr(task_speech, "QUICK", tiny)
    out, runs = tmp_path / "out", tmp_path / "runs"
    argv = ["--quick", "--seeds", "0", "--num-sources", "2", "3", "--out-dir", str(out), "--runs-dir", str(runs)]
    task_speech.main(argv)
    for s in (2, 3):
        rec = json.loads((runs / f"speech-quick-{s}src-seed0.json").read_text())
        assert rec["sizes"]["num_sources"] == s and rec["cpu_s"] > 0
        assert rec["sizes"]["channels"] == list(task_speech.QUICK.channels)
    md = (out / "speech.md").read_text()
    assert "`python -m benchmarks.task_speech --seeds 0 --num-sources 2 3 --quick`" in md
    assert md.count("| 2 | 0 |") == 1 and md.count("| 3 | 0 |") == 1  # one summary line per count
    assert "## Speech separation (synthetic 2-source" in md and "## Speech separation (synthetic 3-source" in md

    def no_run(*args, **kwargs):
        raise AssertionError("a saved run was rerun")

    monkeypatch.setattr(task_speech, "run_seed", no_run)
    task_speech.main(argv)  # every run saved in runs/
    assert (out / "speech.md").read_text() == md
    with pytest.raises(AssertionError, match="rerun"):
        task_speech.main([*argv, "--force"])
    with pytest.raises(SystemExit):
        task_speech.main(["--quick", "--num-sources", "1", "--out-dir", str(out), "--runs-dir", str(runs)])


def test_benchmark_summary_over_source_counts(tmp_path):
    import json

    from benchmarks.task_speech import main

    def record(sources, seed, base, ocd, scale=1.0):
        rows = {"base": base, "OCD": ocd, "oracle, this layer (test label)": base + 0.5}
        rows |= {"nearest-neighbour delta": base + 0.1, "mean-delta control": base + 0.01}
        if scale != 1.0:
            rows["OCD at delta_scale 1"] = base + 0.02
        return {
            "seed": seed,
            "rows": {k: {"si_sdri": v, "si_sdr": v - 6} for k, v in rows.items()},
            "sizes": {"num_sources": sources, "n_train": 1000},
            "cosine_to_oracle": {},
            "delta_scale": scale,
            "times_s": {"data": 1, "base": 2, "ocd_fit": 3, "score": 4},
            "wall_s": 10.0 + seed,
            "cpu_s": 8.0 + seed,
        }

    runs = [record(5, 0, 3.0, 3.5), record(2, 1, 5.0, 5.0, scale=0.0), record(2, 0, 6.0, 6.25)]
    (tmp_path / "speech.json").write_text(json.dumps(runs))
    main(["--render-only", "--out-dir", str(tmp_path)])
    md = (tmp_path / "speech.md").read_text()
    assert "`python -m benchmarks.task_speech --seeds 0 1 --num-sources 2 5`" in md
    # seeds in order; OCD − base +0.25 and 0 (the off seed); at scale 1: +0.25 (the OCD row) and +0.02
    assert (
        "| 2 | 0, 1 | 5.5000 ± 0.7071 | 5.6250 ± 0.8839 | 6.0000 ± 0.7071 | 5.6000 ± 0.7071 (nearest-neighbour delta) "
        "| +0.1250 ± 0.1768 (1/2) | +0.1350 ± 0.1626 (2/2) | +0.5000 ± 0.0000 (2/2) | 10 / 11 | 8 / 9 |" in md
    )
    assert "| 5 | 0 | 3.0000 | 3.5000 | 3.5000 |" in md
    # the five-source table comes before the others
    assert md.index("synthetic 5-source") < md.index("synthetic 2-source")
    assert "did not record their calibration rule" in md

    # the rule the runs used is stated; runs made under different rules are flagged
    for r in runs:
        r["calibration"] = {"min_gain_se": 1.0}
    (tmp_path / "speech.json").write_text(json.dumps(runs))
    main(["--render-only", "--out-dir", str(tmp_path)])
    assert (
        "delta_scale: the best grid value kept only when its validation gain was ≥ 1 standard errors."
        in (tmp_path / "speech.md").read_text()
    )
    runs[0]["calibration"]["min_gain_se"] = 2.0
    (tmp_path / "speech.json").write_text(json.dumps(runs))
    main(["--render-only", "--out-dir", str(tmp_path)])
    assert (
        "different calibration rules (min_gain_se [1.0, 2.0]): rerun them with --force"
        in (tmp_path / "speech.md").read_text()
    )
