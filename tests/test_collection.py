import json
import warnings

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


# ---------------------------------------------------------------------------------------------- reuse and locks
def test_reused_folder_with_other_labels_or_weights_is_refused(small_cnn, image_data, tmp_path):
    run(small_cnn, image_data, tmp_path / "c")
    x, y = image_data.tensors
    relabelled = torch.utils.data.TensorDataset(x, (y + 1) % 5)
    with pytest.raises(ValueError, match=r"fingerprints\.data\.sample_sha256"):
        run(small_cnn, relabelled, tmp_path / "c")
    with torch.no_grad():
        small_cnn.conv.weight[0, 0, 0, 0] += 1e-3  # retrained elsewhere than the target layer
    with pytest.raises(ValueError, match=r"fingerprints\.model_sha256") as err:
        run(small_cnn, image_data, tmp_path / "c")
    assert "layer_sha256" not in str(err.value)


def test_folder_made_before_fingerprints_is_reused_with_a_warning(small_cnn, image_data, tmp_path):
    first = run(small_cnn, image_data, tmp_path / "c")
    path = tmp_path / "c" / "collection.json"
    manifest = json.loads(path.read_text())
    del manifest["fingerprints"]
    path.write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match="predates base-weight and data fingerprints"):
        again = run(small_cnn, image_data, tmp_path / "c")
    torch.testing.assert_close(again.column("delta"), first.column("delta"), atol=0, rtol=0)


CONCURRENT = """
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from conftest import SmallCNN
from ocd_hf.collection import collect_deltas
from ocd_hf.integrations import TorchAdapter
from ocd_hf.losses import cross_entropy

torch.manual_seed(0)
model = SmallCNN()
g = torch.Generator().manual_seed(1)
data = torch.utils.data.TensorDataset(torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g))
a = TorchAdapter(model)
batches = []

def forward(m, inputs):
    batches.append(1)
    time.sleep(0.01)
    return a.forward(m, inputs)

collect_deltas(model, "fc1", data, cross_entropy, sys.argv[1], split_batch=a.split_batch, forward_fn=forward,
               batch_size=4, shard_size=4, progress=False)
open(sys.argv[2], "w").write(json.dumps(len(batches)))
"""


def test_two_concurrent_collectors_share_the_shards(small_cnn, image_data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "collect.py"
    script.write_text(CONCURRENT)
    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path / "c"), str(tmp_path / f"n{i}"), tests], env=env)
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    a, calls = TorchAdapter(small_cnn), []
    alone = collect_deltas(
        small_cnn,
        "fc1",
        image_data,
        cross_entropy,
        tmp_path / "alone",
        split_batch=a.split_batch,
        forward_fn=lambda m, x: calls.append(1) or a.forward(m, x),
        batch_size=4,
        shard_size=4,
        progress=False,
    )
    shared = DeltaStore(tmp_path / "c")
    torch.testing.assert_close(shared.column("delta"), alone.column("delta"), atol=0, rtol=0)
    torch.testing.assert_close(shared.column("index"), torch.arange(40))
    # every shard computed by exactly one of the two. A collector that computes anything first probes
    # the layer with one forward (the memory plan); the rest is a fixed number of calls per shard.
    num_shards = 10
    per_shard = (len(calls) - 1) / num_shards
    made = [json.loads((tmp_path / f"n{i}").read_text()) for i in range(2)]
    assert sum((m - 1) / per_shard for m in made if m) == num_shards
    assert not [p.name for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------- data checks
def test_bad_labels_and_rows_are_named_by_dataset_index(small_cnn, image_data, tmp_path):
    x, y = image_data.tensors
    with pytest.raises(ValueError, match=r"float labels .*dataset indices \[0, 1"):
        run(small_cnn, torch.utils.data.TensorDataset(x, y.float()), tmp_path / "f")
    soft = torch.nn.functional.one_hot(y, 5).float()
    assert len(run(small_cnn, torch.utils.data.TensorDataset(x, soft), tmp_path / "s")) == 40
    xn = x.clone()
    xn[25, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"Dataset indices \[25\] hold NaN or inf"):
        run(small_cnn, torch.utils.data.TensorDataset(xn, y), tmp_path / "n")
    yi = y.clone()
    yi[[3, 30]] = -100
    with pytest.warns(RuntimeWarning, match=r"2 of 40 samples are labelled -100 .*indices \[3, 30\]"):
        store = run(small_cnn, torch.utils.data.TensorDataset(x, yi), tmp_path / "i")
    assert store[3]["delta"].abs().sum() == 0 and store[4]["delta"].abs().sum() > 0


def test_outlier_row_is_named_and_left_out_of_statistics(small_cnn, image_data, tmp_path):
    from ocd_hf.data_checks import RobustStatistics

    clean = run(small_cnn, image_data, tmp_path / "clean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = RobustStatistics(clean)
    for k in ("layer_input", "layer_output", "model_output"):  # no outliers: bit-identical statistics
        assert torch.equal(same.mean(k), clean.mean(k)) and torch.equal(same.std(k), clean.std(k))
    x, y = image_data.tensors
    x = x.clone()
    x[17] *= 1e6
    store = run(small_cnn, torch.utils.data.TensorDataset(x, y), tmp_path / "bad")
    with pytest.warns(RuntimeWarning, match=r"dataset indices \[17\]"):
        robust = RobustStatistics(store)
    assert robust.excluded == [17]
    # without row 17 the spread is that of the clean rows, not blown up by one sample
    keep = [i for i in range(40) if i != 17]
    ref = clean.get_batch(keep)["layer_input"].double()
    torch.testing.assert_close(robust.std("layer_input"), ref.std(0).float(), rtol=1e-5, atol=1e-6)
    assert float(store.std("layer_input").max()) > 1e3 > float(robust.std("layer_input").max())


def test_retry_after_an_error_in_the_same_process_does_not_wait_for_itself(small_cnn, image_data, tmp_path):
    calls = []

    def flaky(out, y):
        calls.append(1)
        if len(calls) == 9:  # in the second shard
            raise RuntimeError("interrupted")
        return cross_entropy(out, y)

    try:
        run(small_cnn, image_data, tmp_path / "r", loss=flaky)
    except RuntimeError as e:
        kept = e  # the traceback keeps the collection's frames, and their shard lock, alive
    store = run(small_cnn, image_data, tmp_path / "r")
    assert len(store) == 40 and kept is not None


def test_shard_writer_writes_safetensors_by_chunks_and_leaves_nothing_on_error(tmp_path):
    from ocd_hf.shards import ShardWriter

    cols = {"delta": torch.randn(10, 3, 4), "scale": torch.rand(10), "index": torch.arange(10)}
    w = ShardWriter(tmp_path / "shard-00000.safetensors", 10)
    for a, b in ((0, 4), (4, 10)):  # the second chunk is submitted while the first may still be written
        w.submit(a, {k: v[a:b].clone() for k, v in cols.items()})
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]
    back = load_file(str(tmp_path / "shard-00000.safetensors"))
    assert back.keys() == cols.keys()
    for k in cols:
        assert torch.equal(back[k], cols[k]), k
    w = ShardWriter(tmp_path / "shard-00001.safetensors", 10)
    w.submit(0, {k: v[:4] for k, v in cols.items()})
    with pytest.raises(KeyError, match="differ"):
        w.submit(4, {"delta": cols["delta"][4:]})
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]


class _Plain(torch.utils.data.Dataset):
    """The same samples as a TensorDataset, read through a DataLoader (not sliced)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_sliced_tensor_dataset_and_data_loader_give_the_same_shards(small_cnn, image_data, tmp_path):
    a = run(small_cnn, image_data, tmp_path / "sliced")
    b = run(small_cnn, _Plain(image_data), tmp_path / "loader")
    for key in ("delta", "scale", "layer_input", "index"):
        assert torch.equal(a.column(key), b.column(key)), key
    assert not list((tmp_path / "sliced").glob("*.tmp-*"))
