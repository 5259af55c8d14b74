"""`ocd-hf` end to end on a tiny BERT classifier saved to a folder and a CSV: fit, info, evaluate, push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub

from ocd_hf.cli import main

WORDS = ["great", "dress", "fits", "terrible", "fabric", "fine", "love", "colour", "awful", "not", "for", "me"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, num_labels=3
    )
    model_dir = root / "model"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(20):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (4,), generator=g).tolist()]
        lines.append(f"{' '.join(words)},{i % 3}")
    csv = root / "reviews.csv"
    csv.write_text("\n".join(lines) + "\n")
    head = root / "head"
    fit = ["fit", str(model_dir), str(csv), "--layer", "classifier", "--output", str(head), "--steps", "5"]
    assert main([*fit, "--channels", "16", "16", "32", "--batch-size", "8", "--quiet"]) == 0
    return model_dir, csv, head


def test_fit_writes_a_head_folder(setup):
    _, _, head = setup
    assert {"ocd_config.json", "ocd_state.json", "ocd_head.safetensors", "README.md"} <= set(os.listdir(head))
    assert "| OCD |" in (head / "README.md").read_text()


def test_info_shows_layer_fingerprint_calibration_and_metrics(setup, capsys):
    _, _, head = setup
    assert main(["info", str(head), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer"] == "classifier" and info["weight_shape"] == [3, 16]
    assert len(info["layer_fingerprint"]) > 8 and info["calibrated"] is True
    assert any(line.startswith("| base |") for line in info["metrics"])
    assert main(["info", str(head)]) == 0
    text = capsys.readouterr().out
    assert "layer: classifier" in text and "delta_scale:" in text and "(calibrated)" in text


def test_evaluate_prints_the_table_with_the_recorded_base_model(setup, capsys):
    _, csv, head = setup
    assert main(["evaluate", str(head), str(csv), "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "| base |" in out and "| OCD x2 |" in out


def test_python_m_ocd_hf_pushes_to_the_hub(setup, tmp_path):
    _, _, head = setup
    token = "hf_dummy_token_for_tests"
    with FakeHub(token=token, max_seconds=120) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": token,
            "HF_HOME": str(tmp_path / "home"),
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "ocd_hf", "push", str(head), "user/cli-head", "--private"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        repo = hub.repos["user/cli-head"]
        sha = proc.stdout.strip().rsplit("/", 1)[1]
        files = repo.commits[sha]
        assert files["ocd_head.safetensors"] == (head / "ocd_head.safetensors").read_bytes()
        assert 'from_pretrained(model, "user/cli-head")' in files["README.md"].decode()


def test_fit_calibrates_and_evaluates_on_disjoint_held_out_rows():
    from ocd_hf.cli import split

    rows = list(range(20))
    train, calibration, test = split(rows, 0.2, seed=0)
    assert len(train) == 16 and len(calibration) == 2 and len(test) == 2
    assert sorted(train + calibration + test) == rows and not set(calibration) & set(test)
    assert split(rows, 0.05, seed=0)[2] is None  # one held-out row only calibrates
    assert split(rows, 0.0, seed=0)[1:] == (None, None)


def test_a_folder_that_is_not_a_head_gives_one_error_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ocd-hf info: error:") and "not a saved OCD head" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        main(["--traceback", "info", str(tmp_path)])
