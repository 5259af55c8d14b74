"""The ViT task: examples/vit_fashion_ocd.py --quick, and OCD on a timm ViT's token-wise MLP layer.

fc2 of a ViT block sees [B, tokens, 768]: the conditioning must pool the tokens, and per-sample weights
(full and factored) must act on every token as a per-sample copy of the layer would.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FASHION = DATA / "vision" / "fashion-mnist"

pytest.importorskip("timm")


def need_data() -> None:
    if not FASHION.is_dir():
        pytest.skip(f"offline Fashion-MNIST folder {FASHION} not found (the example reads ../shared/data)")


def load_example():
    spec = importlib.util.spec_from_file_location("vit_fashion_ocd", ROOT / "examples" / "vit_fashion_ocd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    from benchmarks.task_vit import build_vit

    torch.manual_seed(0)
    return build_vit(depth=2).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def test_heads_are_the_classifier_and_the_last_fc2(vit):
    from benchmarks.task_vit import heads
    from ocd_hf.integrations import get_adapter

    assert get_adapter(vit).preferred_layer == "head"
    shapes = {layer: tuple(vit.get_submodule(layer).weight.shape) for layer, _ in heads(2)}
    assert shapes == {"head": (10, 192), "blocks.1.mlp.fc2": (192, 768)}
    assert [t for _, t in heads(2)] == ["full", "factored", "full", "factored"]


def test_pad_to_centres_the_image():
    from torch.utils.data import TensorDataset

    from benchmarks.task_vit import pad_to

    x, y = torch.ones(2, 1, 28, 28), torch.tensor([3, 4])
    px, py = pad_to(TensorDataset(x, y)).tensors
    assert px.shape == (2, 1, 32, 32) and torch.equal(py, y)
    assert px[..., 2:30, 2:30].eq(1).all() and px.sum() == x.sum()


def test_head_label():
    from benchmarks.task_vit import head_label
    from ocd_hf.evaluation import Row

    assert head_label(Row.ensemble(5), "blocks.3.mlp.fc2", "factored") == "OCD x5 [blocks.3.mlp.fc2, factored]"


def raw_fc2_input(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}

    def hook(module, inputs, output):
        seen["x"] = inputs[0].detach()

    handle = model.get_submodule(layer).register_forward_hook(hook)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"]


def test_fc2_conditioning_is_the_token_mean(vit, images):
    from ocd_hf import OCDWrapper

    layer = "blocks.1.mlp.fc2"
    ocd = OCDWrapper.from_pretrained(vit, layer=layer)
    cond, out = ocd.conditioning(images)
    raw = raw_fc2_input(vit, layer, images)
    assert raw.shape == (3, 17, 768)  # 16 patches and the class token
    torch.testing.assert_close(cond.layer_input, raw.mean(1))
    torch.testing.assert_close(cond.layer_output, vit.get_submodule(layer)(raw).mean(1))
    with torch.no_grad():
        torch.testing.assert_close(out, vit(images))


def per_sample_copies(model: nn.Module, layer: str, x: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """The slow reference: one copy of the model per image, its layer's weight W + deltas[b]."""
    outs = []
    for b in range(len(x)):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.get_submodule(layer).weight += deltas[b]
            outs.append(m(x[b : b + 1]))
    return torch.cat(outs)


def test_fc2_full_deltas_match_per_sample_copies(vit, images):
    from ocd_hf import OCDWrapper

    layer = "blocks.1.mlp.fc2"
    ocd = OCDWrapper.from_pretrained(vit, layer=layer)
    deltas = 0.05 * torch.randn(3, 192, 768, generator=torch.Generator().manual_seed(2))
    fast = ocd.forward_with_deltas(images, deltas)
    torch.testing.assert_close(fast, per_sample_copies(vit, layer, images, deltas), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert (fast - vit(images)).abs().max() > 1e-2  # the deltas did change the output


def test_fc2_factored_deltas_use_the_token_mean_direction(vit, images):
    from ocd_hf import OCDWrapper

    layer = "blocks.1.mlp.fc2"
    ocd = OCDWrapper.from_pretrained(vit, layer=layer, target="factored")
    u = torch.randn(3, 192, generator=torch.Generator().manual_seed(3))
    v = raw_fc2_input(vit, layer, images).mean(1)
    v = v / v.norm(dim=1, keepdim=True)
    reference = per_sample_copies(vit, layer, images, torch.einsum("bo,bi->boi", u, v))
    torch.testing.assert_close(ocd.forward_with_deltas(images, u), reference, rtol=1e-4, atol=1e-5)


def test_markdown_is_mean_and_sd_over_seeds():
    from benchmarks.task_vit import FULL, METRICS, markdown

    sizes = {
        "model": "m",
        "parameters": 1,
        "epochs": 5,
        "lr": 1e-3,
        "source": "s",
        "train": 1,
        "val": 1,
        "test": 1,
        "head_kwargs": {},
        "head_steps": FULL.head_steps,
        "fc2_full_train": 1,
    }
    records = [
        {
            "seed": s,
            "wall_s": 60.0,
            "sizes": sizes,
            "rows": {
                "base": dict.fromkeys(METRICS, float(v)),
                "OCD [head, full]": dict.fromkeys(METRICS, float(v) - 0.1 * (s + 1)),
                "OCD x5 [head, full]": dict.fromkeys(METRICS, float(v)),
            },
            "delta_scale": {"head, full": 0.5},
            "cosine": {"head, full": {"OCD (1 draw)": 0.25}},
        }
        for s, v in ((0, 1), (1, 3))
    ]
    md = markdown(records, "python -m benchmarks.task_vit --seeds 0 1")
    assert "| base | 2.0000 ± 1.4142 | 2.0000 ± 1.4142 | 2.0000 ± 1.4142 |" in md
    assert "seed 0: 60 s, seed 1: 60 s" in md and "- head, full: 0.5, 0.5" in md
    assert "- OCD [head, full] is better than base: ΔCE = -0.1500 ± 0.0707 (SD over 2 seeds; lower in 2/2)" in md
    assert "- OCD x5 [head, full] is no different (within noise) from base" in md


def test_example_quick_runs_offline(capsys):
    need_data()
    load_example().main(["--data-dir", str(FASHION), "--quick"])
    out = capsys.readouterr().out
    assert "trained from scratch on 64 Fashion-MNIST images" in out
    assert "OCD on head (10, 192), target=full: collected, trained and calibrated (delta_scale" in out
    for row in ("| base |", "| oracle, this layer (test label) |", "| OCD x5 |", "| predicted-label rival |"):
        assert row in out


@pytest.mark.slow  # the four heads at quick sizes, each evaluated with every row (tens of seconds)
def test_benchmark_quick_follows_the_interface(tmp_path):
    need_data()
    from benchmarks.task_vit import heads, main
    from ocd_hf.evaluation import Row

    main(["--seeds", "0", "--quick", "--data-root", str(DATA), "--out-dir", str(tmp_path), "--runs-dir", str(tmp_path)])
    rec = json.loads((tmp_path / "vit.json").read_text())["runs"][0]
    assert rec["task"] == "vit" and rec["seed"] == 0 and rec["metrics"][0] == "cross_entropy"
    assert set(rec["higher_is_better"]) == set(rec["metrics"])
    for layer, target in heads(1):
        for row in (Row.ORACLE, Row.OCD, Row.ensemble(5), Row.NO_SCALE, Row.NEAREST_NEIGHBOUR, Row.MEAN_DELTA):
            assert f"{row} [{layer}, {target}]" in rec["rows"]
    assert Row.BASE in rec["rows"] and rec["wall_s"] > 0
    assert (tmp_path / "vit.md").read_text().startswith("## ViT")


def test_the_table_states_the_calibration_rule_the_records_used():
    from benchmarks.stats import calibration_rule

    assert (
        calibration_rule([2.0, 2.0]) == "the best grid value kept only when its validation gain was ≥ 2 standard errors"
    )
    assert calibration_rule([2.0, None]) == "" and calibration_rule([]) == ""  # older records: nothing claimed
    assert calibration_rule([1.0, 2.0]).startswith("the runs used different calibration rules (min_gain_se [1.0, 2.0])")
