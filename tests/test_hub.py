"""Saving, loading and sharing OCD heads: local folders, the Hub cache offline, a push/pull through a local Hub
server, every refusal, and atomic saves."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from hub_server import FakeHub
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Subset

import ocd_hf
from ocd_hf import OCDConfig, OCDWrapper, serialization
from ocd_hf import hub as ocd_hub
from ocd_hf.card import build_model_card
from ocd_hf.constants import CONFIG_NAME, HEAD_NAME, MODEL_CARD_NAME, STATE_NAME
from ocd_hf.demo import LeNetDigits, load_digits_split, train_base
from ocd_hf.evaluation import evaluate
from ocd_hf.layers import layer_fingerprint

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "user/ocd-digits"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # One thread: with two, a second busy process on this 2-core machine slows tiny ops down ~100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, test = load_digits_split(0)
    model = train_base(LeNetDigits(), train, epochs=2)
    ocd = OCDWrapper.from_pretrained(
        model,
        layer="fc2",
        block_out_channels=(16, 16, 32),
        cond_hidden_dim=32,
        scale_hidden_dim=32,
        norm_num_groups=8,
    )
    ocd.fit(Subset(train, range(128)), loss="cross_entropy", num_train_steps=20, progress=False)
    folder = Path(ocd.save_pretrained(tmp_path_factory.mktemp("saved") / "ocd-digits"))
    x = test.tensors[0][:16]
    yield SimpleNamespace(model=model, ocd=ocd, folder=folder, x=x, test=test)
    torch.set_num_threads(threads)


def outputs(ocd: OCDWrapper, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
    return ocd(x, num_samples=num_samples, generator=torch.Generator().manual_seed(0))


def copy_head(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- format
def test_saved_folder_format(trained):
    folder = trained.folder
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, STATE_NAME, HEAD_NAME, MODEL_CARD_NAME])
    raw = json.loads((folder / CONFIG_NAME).read_text())
    # the config holds settings only: no shapes, provenance or fitted values
    assert raw["layer"] == "fc2" and raw["loss"] == "cross_entropy" and raw["task"] == "classification"
    assert not {"weight_shape", "layer_fingerprint", "delta_scale", "target_std", "extra"} & set(raw)
    state = json.loads((folder / STATE_NAME).read_text())
    assert state["format_version"] == serialization.FORMAT_VERSION
    assert state["provenance"]["library_version"] == ocd_hf.__version__
    assert state["shapes"]["weight_shape"] == [84, 120]
    assert state["provenance"]["layer_fingerprint"] == layer_fingerprint(trained.model.fc2.weight)
    assert state["fitted"]["delta_scale"] == 1.0 and state["fitted"]["target_std"] > 0
    assert state["denoiser_config"]["_class_name"] == "UNet1DModel"
    assert state["denoiser_config"]["block_out_channels"] == [16, 16, 32]
    assert state["scheduler_config"]["_class_name"] == "DDIMScheduler"
    assert state["scheduler_config"]["clip_sample"] is False
    with safe_open(folder / HEAD_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(trained.ocd.head.state_dict())
    card = ModelCard.load(folder / MODEL_CARD_NAME)
    assert card.data.library_name == "ocd_hf"
    assert card.data.tags == ["ocd", "diffusion", "weight-generation"]
    # A class name is not a Hub id: no base_model metadata the Hub would reject.
    assert card.data.base_model is None
    assert "OCDWrapper.from_pretrained(model," in card.text and "`fc2` (weight 84×120)" in card.text


def test_model_card_with_evaluation_and_hub_base_model(trained, tmp_path):
    report = evaluate(trained.ocd, Subset(trained.test, range(32)), num_samples=2, progress=False)
    folder = trained.ocd.save_pretrained(tmp_path / "with-eval", evaluation=report)
    card = ModelCard.load(Path(folder) / MODEL_CARD_NAME)
    assert "## Evaluation" in card.text and "| OCD x2 |" in card.text
    assert card.data.metrics == ["cross_entropy", "accuracy", "ece"]

    o = trained.ocd
    record = serialization.make_record(o.config, o.shapes, o.provenance, o.state, o.head, o.module)
    record.provenance = dataclasses.replace(
        record.provenance, base_model="sentence-transformers/all-MiniLM-L6-v2", base_model_library="transformers"
    )
    card = build_model_card(record, repo_id="user/ocd-minilm")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert 'OCDWrapper.from_pretrained(model, "user/ocd-minilm")' in card.text


# ---------------------------------------------------------------------------------------------- local
def test_local_round_trip_is_exact(trained, tmp_path):
    loaded = OCDWrapper.from_pretrained(copy.deepcopy(trained.model), trained.folder)
    assert torch.equal(outputs(loaded, trained.x), outputs(trained.ocd, trained.x))
    assert torch.equal(outputs(loaded, trained.x, 3), outputs(trained.ocd, trained.x, 3))
    ref, got = trained.ocd.head.state_dict(), loaded.head.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    stored = OCDConfig.from_dict(json.loads((trained.folder / CONFIG_NAME).read_text()))
    assert loaded.config == stored == trained.ocd.config
    assert loaded.shapes == trained.ocd.shapes and loaded.state == trained.ocd.state
    assert loaded.provenance.layer_fingerprint == layer_fingerprint(trained.model.fc2.weight)
    assert not loaded.head.training
    assert loaded.config.loss == "cross_entropy" and loaded.loss_fn is not None
    # Loading does not consume the caller's random numbers.
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    OCDWrapper.from_pretrained(trained.model, trained.folder)
    assert torch.equal(torch.rand(3), a)
    # Saving a loaded head writes the same tensors and config again.
    again = Path(loaded.save_pretrained(tmp_path / "again"))
    assert (again / HEAD_NAME).read_bytes() == (trained.folder / HEAD_NAME).read_bytes()
    assert (again / CONFIG_NAME).read_text() == (trained.folder / CONFIG_NAME).read_text()
    assert (again / STATE_NAME).read_text() == (trained.folder / STATE_NAME).read_text()


def test_layer_or_config_with_pretrained_head_refused(trained):
    with pytest.raises(ValueError, match=r"\['layer'\] cannot be combined with a pretrained head"):
        OCDWrapper.from_pretrained(trained.model, trained.folder, layer="fc1")


def test_inference_steps_override(trained):
    loaded = OCDWrapper.from_pretrained(trained.model, trained.folder, num_inference_steps=3)
    assert loaded.config.num_inference_steps == 3


def test_local_folder_wins_over_hub_id(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    copy_head(trained.folder, tmp_path / REPO)
    loaded = OCDWrapper.from_pretrained(trained.model, REPO)
    assert torch.equal(outputs(loaded, trained.x), outputs(trained.ocd, trained.x))


# ---------------------------------------------------------------------------------------------- Hub cache
def build_cache(root: Path, files_from: Path, subfolder: str | None = None, ref: str = "main") -> Path:
    repo = root / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / SHA / (subfolder or "")
    shutil.copytree(files_from, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(SHA)
    return root


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import time; its HTTP session consults this constant per request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_cache_resolves_offline(trained, tmp_path, offline):
    cache = build_cache(tmp_path / "cache", trained.folder)
    expected = outputs(trained.ocd, trained.x)
    for revision in (None, "main", SHA):
        loaded = OCDWrapper.from_pretrained(trained.model, REPO, revision=revision, cache_dir=cache)
        assert torch.equal(outputs(loaded, trained.x), expected)
    with pytest.raises(FileNotFoundError, match="offline mode is on"):
        OCDWrapper.from_pretrained(trained.model, "user/not-cached", cache_dir=cache)


def test_hub_cache_subfolder_offline(trained, tmp_path, offline):
    cache = build_cache(tmp_path / "cache", trained.folder, subfolder="heads/fc2")
    loaded = OCDWrapper.from_pretrained(trained.model, REPO, subfolder="heads/fc2", cache_dir=cache)
    assert torch.equal(outputs(loaded, trained.x), outputs(trained.ocd, trained.x))


def test_invalid_source_names_it(trained):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a valid Hub repo id"):
        OCDWrapper.from_pretrained(trained.model, "./no/such//folder")


# ---------------------------------------------------------------------------------------------- push / pull
CLIENT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file
    from ocd_hf import OCDWrapper
    from ocd_hf.demo import LeNetDigits

    args = json.loads(sys.argv[1])
    model = LeNetDigits()
    model.load_state_dict(load_file(args["base"]))
    model.eval()
    if args["action"] == "push":
        ocd = OCDWrapper.from_pretrained(model, args["head"])
        urls = [
            ocd.push_to_hub(args["repo"], private=True, commit_message="first head"),
            ocd.push_to_hub(args["repo"], revision="exp", commit_message="on a branch"),
            ocd.push_to_hub(args["repo"], create_pr=True),
        ]
        print("URLS=" + json.dumps(urls))
    else:
        x = load_file(args["inputs"])["x"]
        out = {}
        for i, rev in enumerate(args["revisions"]):
            ocd = OCDWrapper.from_pretrained(model, args["repo"], revision=rev)
            out[str(i)] = ocd(x, generator=torch.Generator().manual_seed(0))
        save_file(out, args["out"])
    """
)


def run_client(script: Path, env: dict[str, str], **args) -> str:
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_push_to_hub_then_load_in_fresh_process(trained, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in trained.model.state_dict().items()}, str(base))
    inputs = tmp_path / "inputs.safetensors"
    save_file({"x": trained.x.contiguous()}, str(inputs))
    token = "hf_dummy_token_for_tests"
    with FakeHub(token=token, max_seconds=150) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_TOKEN": token,
            "OMP_NUM_THREADS": "1",
        }
        env["HF_HOME"] = str(tmp_path / "home-push")
        out = run_client(script, env, action="push", base=str(base), head=str(trained.folder), repo=REPO)
        urls = json.loads(out.split("URLS=")[1])
        repo = hub.repos[REPO]
        assert repo.private
        first_sha = urls[0].rsplit("/", 1)[1]
        assert urls[0] == f"{hub.url}/{REPO}/commit/{first_sha}"
        assert urls[2] == f"{hub.url}/{REPO}/discussions/1"
        assert set(repo.refs) == {"main", "exp", "refs/pr/1"}
        assert repo.messages[first_sha] == "first head" and repo.messages[repo.refs["exp"]] == "on a branch"
        assert repo.messages[repo.refs["refs/pr/1"]] == ocd_hub.DEFAULT_COMMIT_MESSAGE
        # One commit per push, each with the three files sent inline.
        assert len(repo.commits) == 4 and repo.upload_modes == ["regular"] * 12
        assert set(repo.commits[first_sha]) == {".gitattributes", CONFIG_NAME, STATE_NAME, HEAD_NAME, MODEL_CARD_NAME}
        assert repo.commits[first_sha][HEAD_NAME] == (trained.folder / HEAD_NAME).read_bytes()
        assert 'from_pretrained(model, "user/ocd-digits")' in repo.commits[first_sha][MODEL_CARD_NAME].decode()

        env["HF_HOME"] = str(tmp_path / "home-pull")
        revisions = [None, "exp", first_sha, "refs/pr/1"]
        got = tmp_path / "got.safetensors"
        run_client(
            script, env, action="pull", base=str(base), inputs=str(inputs), repo=REPO, revisions=revisions, out=str(got)
        )
        paths = [p for _, p in hub.requests]
        assert any(p.endswith(f"/resolve/main/{HEAD_NAME}") for p in paths)
        assert any(f"/resolve/refs%2Fpr%2F1/{CONFIG_NAME}" in p for p in paths)
    expected = outputs(trained.ocd, trained.x)
    for i, value in load_file(str(got)).items():
        assert torch.equal(value, expected), revisions[int(i)]
    snapshots = tmp_path / "home-pull" / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots"
    assert first_sha in os.listdir(snapshots)


def test_push_refuses_pr_on_branch(trained):
    with pytest.raises(ValueError, match="pull request against main"):
        trained.ocd.push_to_hub(REPO, revision="exp", create_pr=True)


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_pickle_only_folder(trained, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(trained.folder / CONFIG_NAME, folder)
    (folder / "ocd_head.bin").write_bytes(b"not opened")
    (folder / "extra.pt").write_bytes(b"not opened")
    with pytest.raises(
        ValueError, match=r"only pickle-based weight files \['extra.pt', 'ocd_head.bin'\].*safetensors is required"
    ):
        OCDWrapper.from_pretrained(trained.model, folder)


def test_refuses_pickle_only_hub_snapshot(trained, tmp_path, offline):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(trained.folder / CONFIG_NAME, pickled)
    (pickled / "ocd_head.pth").write_bytes(b"not opened")
    cache = build_cache(tmp_path / "cache", pickled)
    with pytest.raises(ValueError, match=r"\['ocd_head.pth'\].*safetensors is required"):
        OCDWrapper.from_pretrained(trained.model, REPO, cache_dir=cache)


def test_refuses_other_base_weights(trained):
    model = copy.deepcopy(trained.model)
    with torch.no_grad():
        model.fc2.weight[0, 0] += 1e-3
    with pytest.raises(ValueError) as err:
        OCDWrapper.from_pretrained(model, trained.folder)
    msg = str(err.value)
    for part in ("LeNetDigits", "'fc2'", "(84, 120)", "allow_mismatch=True", "different weights"):
        assert part in msg
    with pytest.warns(UserWarning, match="Loading anyway"):
        loaded = OCDWrapper.from_pretrained(model, trained.folder, allow_mismatch=True)
    assert loaded.head is not None


class OtherNet(nn.Module):
    def __init__(self, out: int = 42):
        super().__init__()
        self.fc2 = nn.Linear(120, out)

    def forward(self, x):
        return self.fc2(x)


def test_refuses_other_shape_and_missing_layer(trained):
    with pytest.raises(ValueError) as err:
        OCDWrapper.from_pretrained(OtherNet(), trained.folder, allow_mismatch=True)
    msg = str(err.value)
    for part in ("LeNetDigits", "'fc2'", "(84, 120)", "(42, 120)", "OtherNet", "cannot be overridden"):
        assert part in msg
    with pytest.raises(ValueError, match="given model Sequential has no such layer"):
        OCDWrapper.from_pretrained(nn.Sequential(OtherNet()), trained.folder)


def test_refuses_truncated_safetensors(trained, tmp_path):
    folder = copy_head(trained.folder, tmp_path / "truncated")
    data = (folder / HEAD_NAME).read_bytes()
    (folder / HEAD_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"changed after it was saved.*force_download=True"):
        OCDWrapper.from_pretrained(trained.model, folder)
    # without the checksum the safetensors reader still refuses it
    with pytest.warns(UserWarning, match="verify_checksum=False"), pytest.raises(OSError, match="corrupted or trunc"):
        OCDWrapper.from_pretrained(trained.model, folder, verify_checksum=False)
    (folder / HEAD_NAME).write_bytes(data[:4])
    with pytest.warns(UserWarning, match="verify_checksum=False"), pytest.raises(OSError, match="corrupted or trunc"):
        OCDWrapper.from_pretrained(trained.model, folder, verify_checksum=False)


def test_refuses_corrupted_config(trained, tmp_path):
    folder = copy_head(trained.folder, tmp_path / "bad-config")
    (folder / CONFIG_NAME).write_text('{"layer": "fc2", ')
    with pytest.raises(OSError, match="not valid JSON.*corrupted"):
        OCDWrapper.from_pretrained(trained.model, folder)


def test_refuses_missing_and_extra_tensors(trained, tmp_path):
    state = load_file(str(trained.folder / HEAD_NAME))
    folder = copy_head(trained.folder, tmp_path / "missing")
    load = functools.partial(OCDWrapper.from_pretrained, trained.model, folder, verify_checksum=False)
    save_file({k: v for k, v in state.items() if k != "mean_delta"}, str(folder / HEAD_NAME))
    with pytest.raises(ValueError, match=r"missing tensors \['mean_delta'\], unexpected tensors \[\]"):
        with pytest.warns(UserWarning, match="verify_checksum=False"):
            load()
    save_file({**state, "bogus.weight": torch.zeros(2)}, str(folder / HEAD_NAME))
    with pytest.raises(ValueError, match=r"missing tensors \[\], unexpected tensors \['bogus.weight'\]"):
        with pytest.warns(UserWarning, match="verify_checksum=False"):
            load()
    save_file({**state, "mean_delta": torch.zeros(3)}, str(folder / HEAD_NAME))
    with pytest.raises(ValueError, match="wrong shape.*mean_delta"):
        with pytest.warns(UserWarning, match="verify_checksum=False"):
            load()


def test_unknown_config_key_warns_and_loads(trained, tmp_path):
    folder = copy_head(trained.folder, tmp_path / "future")
    raw = json.loads((folder / CONFIG_NAME).read_text())
    raw["option_from_the_future"] = 1
    (folder / CONFIG_NAME).write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="option_from_the_future"):
        loaded = OCDWrapper.from_pretrained(trained.model, folder)
    assert torch.equal(outputs(loaded, trained.x), outputs(trained.ocd, trained.x))


def test_changed_diffusers_config_warns(trained, tmp_path):
    folder = copy_head(trained.folder, tmp_path / "sched")
    raw = json.loads((folder / STATE_NAME).read_text())
    raw["scheduler_config"]["timestep_spacing"] = "leading"
    (folder / STATE_NAME).write_text(json.dumps(raw))
    with pytest.warns(UserWarning, match="DDIMScheduler config.*timestep_spacing"):
        OCDWrapper.from_pretrained(trained.model, folder)


def test_missing_head_file(trained, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="has no ocd_head.safetensors"):
        OCDWrapper.from_pretrained(trained.model, folder)


# ---------------------------------------------------------------------------------------------- atomic save
def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_crash_during_save_leaves_no_half_written_head(trained, tmp_path, monkeypatch):
    target = tmp_path / "head"

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(serialization, "save_bytes", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        trained.ocd.save_pretrained(target)
    assert not target.exists() and leftovers(tmp_path) == []

    monkeypatch.undo()
    trained.ocd.save_pretrained(target)
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}
    monkeypatch.setattr(serialization, "save_bytes", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        trained.ocd.save_pretrained(target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert leftovers(tmp_path) == []


def test_save_replaces_previous_head(trained, tmp_path):
    target = tmp_path / "head"
    trained.ocd.save_pretrained(target)
    (target / HEAD_NAME).write_bytes(b"stale")
    trained.ocd.save_pretrained(target)
    assert (target / HEAD_NAME).read_bytes() == (trained.folder / HEAD_NAME).read_bytes()
    assert leftovers(tmp_path) == []


def test_save_refuses_folder_with_other_files(trained, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not part of an OCD head \(\['notes.txt'\]\)"):
        trained.ocd.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_save_requires_a_trained_head(trained):
    fresh = OCDWrapper.from_pretrained(trained.model, layer="fc2")
    with pytest.raises(RuntimeError, match="no trained head"):
        fresh.save_pretrained("unused")


def test_model_card_names_a_local_base_model_by_its_folder(trained):
    o = trained.ocd
    record = serialization.make_record(o.config, o.shapes, o.provenance, o.state, o.head, o.module)
    record.provenance = dataclasses.replace(
        record.provenance, base_model="/home/someone/models/minilm-finetuned", base_model_library="transformers"
    )
    card = build_model_card(record, repo_id="user/ocd-local")
    assert card.data.base_model is None  # a path is not a Hub id
    assert "# OCD head for `minilm-finetuned (a local folder)`" in card.text
    assert "# minilm-finetuned (a local folder): the same architecture" in card.text
    assert "`/home/someone/models/minilm-finetuned`" in card.text  # the full path stays in the settings table
