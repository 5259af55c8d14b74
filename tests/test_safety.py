"""Fault-campaign regressions: tampered tensors, edited configs, unsafe paths, killed saves, bad data."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ocd_hf import OCDWrapper
from ocd_hf.config import ConfigError
from ocd_hf.constants import CONFIG_NAME, HEAD_NAME, STATE_NAME

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_head_v0_1"


def legacy_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    model.load_state_dict(load_file(str(LEGACY / "base_model.safetensors")))
    return model.eval()


def load(folder, **kw):
    return OCDWrapper.from_pretrained(legacy_model(), folder, **kw)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The 0.1 fixture head re-saved in the current format."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ocd = load(LEGACY / "head")
    return Path(ocd.save_pretrained(tmp_path_factory.mktemp("saved") / "head"))


@pytest.fixture
def head(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "head"))


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def outputs(ocd) -> torch.Tensor:
    return ocd(load_file(str(LEGACY / "expected.safetensors"))["inputs"], generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- checksum
def test_sha256_of_tensors_is_recorded_and_clean_head_loads_silently(head):
    import hashlib

    state = json.loads((head / STATE_NAME).read_text())
    assert state["head_sha256"] == hashlib.sha256((head / HEAD_NAME).read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ocd = load(head)
    assert torch.equal(outputs(ocd), load_file(str(LEGACY / "expected.safetensors"))["outputs"])


@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
def test_flipped_byte_in_tensors_is_refused(head, where):
    data = bytearray((head / HEAD_NAME).read_bytes())
    data[int(len(data) * where)] ^= 0x01
    (head / HEAD_NAME).write_bytes(bytes(data))
    with pytest.raises(OSError, match=rf"{HEAD_NAME} has sha256 .*changed after it was saved.*verify_checksum=False"):
        load(head)
    with pytest.warns(UserWarning, match="Loading anyway"):
        load(head, verify_checksum=False)


def test_edited_tensor_in_valid_file_is_refused(head):
    from safetensors.torch import save_file

    state = load_file(str(head / HEAD_NAME))
    key = next(k for k in state if k.startswith("scale_net") and k.endswith("bias"))
    state[key] = state[key] + 5
    save_file(state, str(head / HEAD_NAME), metadata={"format": "pt"})
    with pytest.raises(OSError, match="changed after it was saved"):
        load(head)


def test_heads_without_checksum_still_load_with_a_warning(head):
    with pytest.warns(UserWarning, match="no recorded sha256"):
        ocd = load(LEGACY / "head")
    assert torch.equal(outputs(ocd), load_file(str(LEGACY / "expected.safetensors"))["outputs"])

    # format 2 (saved before checksums): the checksum and model fingerprint may be absent
    def to_v2(d):
        d.update(format_version=2)
        d.pop("head_sha256")
        d["provenance"].pop("model_fingerprint")

    edit_json(head / STATE_NAME, to_v2)
    with pytest.warns(UserWarning, match="no recorded sha256"):
        load(head)


# ---------------------------------------------------------------------------------------------- strict keys
@pytest.mark.parametrize(
    ("file", "key"),
    [
        (CONFIG_NAME, "num_inference_steps"),
        (CONFIG_NAME, "task"),
        (CONFIG_NAME, "guidance_scale"),
        (STATE_NAME, "head_sha256"),
        (STATE_NAME, "denoiser_config"),
        (STATE_NAME, "fitted.delta_scale"),
        (STATE_NAME, "fitted.target_std"),
        (STATE_NAME, "provenance.layer_fingerprint"),
        (STATE_NAME, "provenance.model_fingerprint"),
        (STATE_NAME, "shapes.output_dim"),
    ],
)
def test_deleted_key_is_refused_naming_file_and_key(head, file, key):
    def drop(d):
        *parents, last = key.split(".")
        for p in parents:
            d = d[p]
        del d[last]

    edit_json(head / file, drop)
    with pytest.raises(ConfigError, match=rf"lacks \['{key}'\]") as err:
        load(head)
    assert str(head / file) in str(err.value)


def test_null_fingerprint_refused_and_null_target_std_warns(head):
    edit_json(head / STATE_NAME, lambda d: d["fitted"].update(target_std=None))
    with pytest.warns(UserWarning, match="target_std is null, so the sampling health check is off"):
        load(head)
    edit_json(head / STATE_NAME, lambda d: d["provenance"].update(layer_fingerprint=None))
    with pytest.raises(ConfigError, match=r"ocd_state.json: provenance.layer_fingerprint is null"):
        load(head)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(num_inference_steps=0), "num_inference_steps=0 is out of range"),
        (lambda d: d.update(num_train_timesteps="1000"), "num_train_timesteps='1000' is not a valid value"),
        (lambda d: d.update(beta_schedule="bogus"), "beta_schedule='bogus'"),
    ],
)
def test_bad_config_values_name_the_file(head, edit, message):
    edit_json(head / CONFIG_NAME, edit)
    with pytest.raises(ConfigError, match=message) as err:
        load(head)
    assert str(head / CONFIG_NAME) in str(err.value)


# ---------------------------------------------------------------------------------------------- paths
def test_subfolder_may_not_leave_the_head_folder(head, tmp_path):
    for bad in ("../head", "a/../../head", "..", "/etc", "a\\..\\..\\x"):
        with pytest.raises(ValueError, match="leaves the head folder"):
            load(tmp_path / "unused", subfolder=bad)
    (head.parent / "outer").mkdir()
    with pytest.raises(ValueError, match="leaves the head folder"):
        load(head.parent / "outer", subfolder="../head")


@pytest.mark.parametrize("source", ["./outputs/head", "outputs/run1/head", "../head", "/no/such/head", "a\\b"])
def test_missing_path_fails_locally_without_the_hub(tmp_path, monkeypatch, source):
    from ocd_hf import hub

    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted for a path")

    monkeypatch.setattr(hub, "hf_hub_download", no_network)
    with pytest.raises(FileNotFoundError, match=r"No local folder .* exists .*nor a valid Hub repo id"):
        load(source)


def test_missing_relative_folder_shaped_like_a_repo_id_says_so(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"offline mode is on.*No local folder .*outputs/head exists either"):
        load("outputs/head", cache_dir=tmp_path / "cache")


def test_repo_id_rule():
    from ocd_hf.hub import looks_like_repo_id

    assert all(map(looks_like_repo_id, ["gpt2", "user/ocd-digits", "org/model.v2", "a_b/c-d"]))
    assert not any(map(looks_like_repo_id, ["./head", "/abs", "a/b/c", "..", "a/../b", ".hidden", "a/b/", "é/x"]))


# ---------------------------------------------------------------------------------------------- killed saves
def dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_killed_between_renames_restores_the_new_head_at_load(saved, tmp_path):
    pid = dead_pid()
    # the state after os.rename(target, old) and before os.rename(tmp, target)
    shutil.copytree(saved, tmp_path / f".head.old-{pid}-0000abcd")
    shutil.copytree(saved, tmp_path / f".head.tmp-{pid}-0000abcd")
    (tmp_path / f".head.tmp-{pid}-0000abcd" / "README.md").write_text("new")
    with pytest.warns(RuntimeWarning, match=r"was missing: a save was killed.*Restored the new head"):
        load(tmp_path / "head")
    assert (tmp_path / "head" / "README.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_killed_between_renames_restores_the_old_head_when_new_is_incomplete(saved, tmp_path):
    pid = dead_pid()
    shutil.copytree(saved, tmp_path / f".head.old-{pid}-0000abcd")
    (tmp_path / f".head.tmp-{pid}-0000abcd").mkdir()
    with pytest.warns(RuntimeWarning, match="Restored the previous head"):
        load(tmp_path / "head")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_save_sweeps_debris_of_dead_saves_only(saved, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ocd = load(saved)
    pid, me = dead_pid(), __import__("os").getpid()
    for name in (
        f".head.tmp-{pid}-0000abcd",
        f".head.old-{pid}-0000abce",
        ".head.tmp-1234abcd",
        f".head.tmp-{me}-0000abcf",
    ):
        shutil.copytree(saved, tmp_path / name)
    (tmp_path / ".other.tmp-1234abcd").mkdir()
    with pytest.warns(RuntimeWarning, match="Restored the previous head"):  # the dead save's old head, first
        ocd.save_pretrained(tmp_path / "head")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".head.tmp-{me}-0000abcf", ".other.tmp-1234abcd", "head"]


# ---------------------------------------------------------------------------------------------- base model
def test_model_differing_outside_the_layer_is_refused(head):
    model = legacy_model()
    with torch.no_grad():
        model[0].bias[0] += 1e-3
    with pytest.raises(ValueError, match="differs outside the target layer.*allow_mismatch=True"):
        OCDWrapper.from_pretrained(model, head)
    with pytest.warns(UserWarning, match="Loading anyway"):
        OCDWrapper.from_pretrained(model, head, allow_mismatch=True)


def test_other_output_size_is_named_at_first_call(head):
    model = nn.Sequential(*legacy_model(), nn.Linear(3, 5))
    with pytest.warns(UserWarning, match="differs outside the target layer"):
        ocd = OCDWrapper.from_pretrained(model, head, allow_mismatch=True)
    with pytest.raises(ValueError, match="output has 5 values per sample, but the head was trained on a model with 3"):
        ocd(torch.zeros(2, 6))


def test_non_finite_input_rows_are_named_as_input_errors(head):
    ocd = load(head)
    x = torch.randn(8, 6)
    x[3, 1] = float("nan")
    x[6, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Input rows \[3, 6\] contain NaN or inf"):
        ocd(x)
    # finite inputs that overflow inside the model are named too, and the head is not blamed
    from ocd_hf.capture import Conditioning
    from ocd_hf.health import check_conditioning

    cond = Conditioning(torch.randn(8, 12), torch.randn(8, 3), torch.randn(8, 3))
    cond.layer_input[5, 2] = float("inf")
    with pytest.raises(ValueError, match=r"1 of 8 inputs .*batch rows 5 \(.*\).*the head is not at fault"):
        check_conditioning(cond, ocd.shapes)
