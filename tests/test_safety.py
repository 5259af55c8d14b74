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
