import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ocd_hf.collection import DeltaStore, collect_deltas
from ocd_hf.integrations import TorchAdapter
from ocd_hf.losses import cross_entropy
from ocd_hf.overfit import OverfitSettings


def run(model, data, path, loss=cross_entropy, settings=None, **kw):
    a = TorchAdapter(model)
    return collect_deltas(
        model,
        "fc1",
        data,
        loss,
        path,
        settings,
        split_batch=a.split_batch,
        forward_fn=a.forward,
        batch_size=8,
        shard_size=16,
        progress=False,
        **kw,
    )


def test_collection_matches_direct_and_is_memory_mapped(small_cnn, image_data, tmp_path):
    store = run(small_cnn, image_data, tmp_path / "c")
    assert len(store) == 40 and store.weight_shape == (24, 64)
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert isinstance(store._arrays["delta"][0], np.memmap)
    torch.testing.assert_close(store.column("index"), torch.arange(40))
    from ocd_hf.overfit import overfit_batch

    x, y = image_data.tensors
    direct = overfit_batch(small_cnn, small_cnn.fc1, x[17:19], y[17:19], cross_entropy)
    b = store.get_batch([17, 18])
    torch.testing.assert_close(b["delta"], direct.delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(b["layer_input"], direct.layer_input)
    torch.testing.assert_close(store.mean("scale"), store.column("scale").mean(), atol=1e-6, rtol=0)
    assert load_file(str(tmp_path / "c" / "shard-00000.safetensors"))["delta"].shape == (16, 24, 64)


def test_resume_after_kill_loses_and_repeats_nothing(small_cnn, image_data, tmp_path):
    full = run(small_cnn, image_data, tmp_path / "full")
    calls = {"n": 0}

    def dying_loss(out, target):
        calls["n"] += 1
        if calls["n"] > 3 * 3:  # dies during the 4th batch = inside shard 1
            raise KeyboardInterrupt("killed")
        return cross_entropy(out, target)

    with pytest.raises(KeyboardInterrupt):
        run(small_cnn, image_data, tmp_path / "r", loss=dying_loss)
    done = sorted(p.name for p in (tmp_path / "r").glob("shard-*.safetensors"))
    assert done == ["shard-00000.safetensors"]
    (tmp_path / "r" / "shard-00001.safetensors.tmp").write_bytes(b"half written")  # a kill during save
    with pytest.raises(FileNotFoundError, match="incomplete"):
        DeltaStore(tmp_path / "r")
    resumed = run(small_cnn, image_data, tmp_path / "r")
    torch.testing.assert_close(resumed.column("index"), torch.arange(40))
    torch.testing.assert_close(resumed.column("delta"), full.column("delta"), atol=1e-7, rtol=0)


def test_settings_change_refused(small_cnn, image_data, tmp_path):
    run(small_cnn, image_data, tmp_path / "c")
    with pytest.raises(ValueError, match="other settings"):
        run(small_cnn, image_data, tmp_path / "c", settings=OverfitSettings(lr=1e-2))
    manifest = json.loads((tmp_path / "c" / "collection.json").read_text())
    assert manifest["overfit"]["lr"] == 5e-4


def test_multi_process_split(small_cnn, image_data, tmp_path):
    assert run(small_cnn, image_data, tmp_path / "m", process_index=1, num_processes=2) is None
    assert sorted(p.name for p in (tmp_path / "m").glob("shard-*")) == ["shard-00001.safetensors"]
    run(small_cnn, image_data, tmp_path / "m", process_index=0, num_processes=2)
    torch.testing.assert_close(DeltaStore(tmp_path / "m").column("index"), torch.arange(40))
