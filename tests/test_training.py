import hashlib
import json
import pickle
import shutil
import warnings

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, shapes_of
from safetensors.torch import save_file

from ocd_hf import OCDConfig, OCDTrainingArguments
from ocd_hf.collection import collect_deltas
from ocd_hf.config import ConfigError
from ocd_hf.head import OCDHead
from ocd_hf.integrations import TorchAdapter
from ocd_hf.losses import cross_entropy
from ocd_hf.training import EMA_NAME, latest_checkpoint, train_head


def make_store(model, data, path):
    a = TorchAdapter(model)
    return collect_deltas(
        model,
        "fc2",
        data,
        cross_entropy,
        path,
        split_batch=a.split_batch,
        forward_fn=a.forward,
        batch_size=20,
        progress=False,
    )


def head_config():
    return OCDConfig(layer="fc2", **TINY_HEAD)


def train_args(steps, **kw):
    return OCDTrainingArguments(num_train_steps=steps, **{**TINY_TRAIN, **kw})


def test_resume_from_checkpoint_is_exact(small_cnn, image_data, tmp_path):
    store = make_store(small_cnn, image_data, tmp_path / "c")
    cfg, shapes = head_config(), shapes_of(store)
    args = train_args(12, output_dir=str(tmp_path / "a"), checkpoint_every=6)
    torch.manual_seed(0)
    straight = OCDHead(cfg, shapes)
    h1 = train_head(straight, store, cfg, args)
    assert latest_checkpoint(tmp_path / "a").name == "step-6"
    # A second run over the same folder picks up at step 6 and must end exactly where the first did.
    torch.manual_seed(123)
    resumed = OCDHead(cfg, shapes)
    h2 = train_head(resumed, store, cfg, args)
    assert [r["step"] for r in h2] == list(range(7, 13))
    assert [r["denoiser_loss"] for r in h2] == [r["denoiser_loss"] for r in h1[6:]]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_unfinished_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoints" / "step-40").mkdir(parents=True)  # killed during save: no "done" marker
    done20 = tmp_path / "checkpoints" / "step-20"
    done20.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(done20 / EMA_NAME))
    digest = hashlib.sha256((done20 / EMA_NAME).read_bytes()).hexdigest()
    (done20 / "done").write_text(json.dumps({"step": 20, "files": {EMA_NAME: digest}}))
    assert latest_checkpoint(tmp_path).name == "step-20"


def test_ema_weights_are_stored(small_cnn, image_data, tmp_path):
    store = make_store(small_cnn, image_data, tmp_path / "c")
    cfg, shapes = head_config(), shapes_of(store)
    torch.manual_seed(0)
    h = OCDHead(cfg, shapes)
    train_head(h, store, cfg, train_args(5, ema_decay=0.0))  # decay 0: EMA == last weights
    torch.manual_seed(0)
    h2 = OCDHead(cfg, shapes)
    train_head(h2, store, cfg, train_args(5, ema_decay=0.999))
    # with a slow EMA the stored weights stay near the init; with decay 0 they are the trained ones
    torch.manual_seed(0)
    init = OCDHead(cfg, shapes)
    w = "denoiser.enc_input.net.0.weight"
    d_fast = (h.state_dict()[w] - init.state_dict()[w]).abs().sum()
    d_slow = (h2.state_dict()[w] - init.state_dict()[w]).abs().sum()
    assert d_slow < d_fast
    assert not h.training


# ---------------------------------------------------------------------------------------------- safe resume
class _Marker:
    """Unpickling this creates a file: proof that a checkpoint file was fully unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(folder, marker):
    with open(folder / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_Marker(marker), f)
    torch.save({"evil": _Marker(marker)}, folder / "custom_checkpoint_1.pkl")


def _resume_run(store, cfg, shapes, args):
    torch.manual_seed(123)
    head = OCDHead(cfg, shapes)
    return head, train_head(head, store, cfg, args)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 12-step run checkpointed every 4 steps, and its final head."""
    torch.manual_seed(0)
    from conftest import SmallCNN

    model = SmallCNN()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    )
    root = tmp_path_factory.mktemp("straight")
    store = make_store(model, data, root / "c")
    cfg, shapes = head_config(), shapes_of(store)
    args = train_args(12, output_dir=str(root / "a"), checkpoint_every=4, save_total_limit=None)
    torch.manual_seed(0)
    head = OCDHead(cfg, shapes)
    hist = train_head(head, store, cfg, args)
    return store, cfg, shapes, args, head, hist, root / "a"


def _copy_run(straight, tmp_path):
    store, cfg, shapes, args, head, hist, out = straight
    shutil.copytree(out, tmp_path / "a")
    return args.replace(output_dir=str(tmp_path / "a"))


def test_resume_never_unpickles_planted_files(straight, tmp_path):
    store, cfg, shapes, _, head, hist, _ = straight
    args = _copy_run(straight, tmp_path)
    ckpt = tmp_path / "a" / "checkpoints" / "step-8"
    assert (ckpt / EMA_NAME).exists() and not list(ckpt.glob("custom_checkpoint_*"))
    marker = tmp_path / "pwned"
    _plant(ckpt, marker)
    resumed, h2 = _resume_run(store, cfg, shapes, args)
    assert not marker.exists()
    assert [r["denoiser_loss"] for r in h2] == [r["denoiser_loss"] for r in hist[8:]]
    for (k, a), (_, b) in zip(head.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_pickle_in_place_of_optimizer_state_is_refused_not_run(straight, tmp_path):
    store, cfg, shapes, _, head, hist, _ = straight
    args = _copy_run(straight, tmp_path)
    ckpt = tmp_path / "a" / "checkpoints" / "step-8"
    marker = tmp_path / "pwned"
    torch.save({"state": _Marker(marker)}, ckpt / "optimizer.bin")
    with pytest.warns(RuntimeWarning, match="optimizer.bin changed"):
        resumed, h2 = _resume_run(store, cfg, shapes, args)  # falls back to step-4
    assert not marker.exists()
    assert [r["step"] for r in h2] == list(range(5, 13))
    # Even with the done marker rewritten to match, the file is loaded with weights_only=True: refused.
    args2 = _copy_run(straight, tmp_path / "b")
    ckpt = tmp_path / "b" / "a" / "checkpoints" / "step-8"
    torch.save({"state": _Marker(marker)}, ckpt / "optimizer.bin")
    done = json.loads((ckpt / "done").read_text())
    done["files"]["optimizer.bin"] = hashlib.sha256((ckpt / "optimizer.bin").read_bytes()).hexdigest()
    (ckpt / "done").write_text(json.dumps(done))
    with pytest.raises(RuntimeError, match="failed to load"):
        _resume_run(store, cfg, shapes, args2)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty_done", "garbage_done", "truncated_model", "truncated_ema"])
def test_damaged_newest_checkpoint_falls_back_to_previous(straight, tmp_path, damage):
    store, cfg, shapes, _, head, hist, _ = straight
    args = _copy_run(straight, tmp_path)
    ckpt = tmp_path / "a" / "checkpoints" / "step-8"
    if damage == "empty_done":
        (ckpt / "done").write_text("")
    elif damage == "garbage_done":
        (ckpt / "done").write_bytes(b"\x00\xff{")
    else:
        f = ckpt / ("model.safetensors" if damage == "truncated_model" else EMA_NAME)
        f.write_bytes(f.read_bytes()[:-7])
    with pytest.warns(RuntimeWarning, match="Skipping checkpoint .*step-8"):
        assert latest_checkpoint(tmp_path / "a").name == "step-4"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        resumed, h2 = _resume_run(store, cfg, shapes, args)
    assert [r["step"] for r in h2] == list(range(5, 13))
    for (k, a), (_, b) in zip(head.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_done_marker_lists_hashes_and_old_checkpoints_are_pruned(straight, tmp_path):
    store, cfg, shapes, args, *_ = straight
    args_dir = straight[6] / "checkpoints"
    ckpts = sorted(p.name for p in args_dir.iterdir())
    assert ckpts == ["step-4", "step-8"]  # save_total_limit=None keeps all
    done = json.loads((args_dir / "step-8" / "done").read_text())
    assert done["step"] == 8 and EMA_NAME in done["files"] and "optimizer.bin" in done["files"]
    torch.manual_seed(0)
    out = tmp_path / "p"
    train_head(OCDHead(cfg, shapes), store, cfg, train_args(13, output_dir=str(out), checkpoint_every=3))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-9"]  # default limit 2
    with pytest.raises(ValueError, match="save_total_limit"):
        train_args(5, save_total_limit=0)


def test_zero_delta_rows_are_skipped_and_counted(small_cnn, image_data, tmp_path):
    x, y = image_data.tensors
    y = y.clone()
    y[[2, 7, 33]] = -100  # cross_entropy's ignore_index: zero loss, zero delta
    with pytest.warns(RuntimeWarning, match="3 of 40 samples are labelled -100"):
        store = make_store(small_cnn, torch.utils.data.TensorDataset(x, y), tmp_path / "c")
    cfg, shapes = head_config(), shapes_of(store)
    seen = []
    get_batch = store.get_batch
    store.get_batch = lambda idx: seen.append(torch.as_tensor(idx).clone()) or get_batch(idx)
    with pytest.warns(RuntimeWarning, match=r"3 of 40 collected samples have a zero delta .*indices \[2, 7, 33\]"):
        train_head(OCDHead(cfg, shapes), store, cfg, train_args(6))
    drawn = set(torch.cat(seen[-6:]).tolist())
    assert drawn and not drawn & {2, 7, 33}


# ---------------------------------------------------------------------------------------------- early stopping
def test_early_stopping_stops_on_a_plateau_and_records_the_step(small_cnn, image_data, tmp_path):
    store = make_store(small_cnn, image_data, tmp_path / "c")
    cfg, shapes = head_config(), shapes_of(store)
    # a learning rate far below float32 resolution: the weights, hence the held-out loss, never change
    args = train_args(50, learning_rate=1e-30, eval_every=2, eval_size=4, early_stopping_patience=2)
    torch.manual_seed(0)
    hist = train_head(OCDHead(cfg, shapes), store, cfg, args)
    assert [r["step"] for r in hist] == list(range(1, 7))  # best at step 2, no better at 4 and 6: stop
    assert hist[-1]["stopped_early"] is True
    evals = [r["eval_denoiser_loss"] for r in hist if "eval_denoiser_loss" in r]
    assert len(evals) == 3 and evals[0] == evals[1] == evals[2]
    assert not any("stopped_early" in r for r in hist[:-1])


def test_disabled_early_stopping_changes_nothing(small_cnn, image_data, tmp_path):
    store = make_store(small_cnn, image_data, tmp_path / "c")
    cfg, shapes = head_config(), shapes_of(store)
    heads, hists = [], []
    for extra in ({}, {"eval_every": 2, "eval_size": 4, "early_stopping_patience": None}):
        torch.manual_seed(0)
        heads.append(OCDHead(cfg, shapes))
        hists.append(train_head(heads[-1], store, cfg, train_args(6, **extra)))
    assert hists[0] == hists[1] and not any("eval_denoiser_loss" in r for r in hists[0])
    for (k, a), (_, b) in zip(heads[0].state_dict().items(), heads[1].state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_resume_with_early_stopping_is_exact(small_cnn, image_data, tmp_path):
    store = make_store(small_cnn, image_data, tmp_path / "c")
    cfg, shapes = head_config(), shapes_of(store)
    args = train_args(
        12, output_dir=str(tmp_path / "a"), checkpoint_every=6, eval_every=2, eval_size=4, early_stopping_patience=50
    )
    torch.manual_seed(0)
    straight = OCDHead(cfg, shapes)
    h1 = train_head(straight, store, cfg, args)
    done = json.loads((tmp_path / "a" / "checkpoints" / "step-6" / "done").read_text())
    assert done["early_stopping"]["best"] == min(r["eval_denoiser_loss"] for r in h1[:6] if "eval_denoiser_loss" in r)
    torch.manual_seed(123)
    resumed = OCDHead(cfg, shapes)
    h2 = train_head(resumed, store, cfg, args)
    assert h2 == h1[6:]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)


def test_early_stopping_arguments_are_checked():
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        OCDTrainingArguments(early_stopping_patience=0)
    with pytest.raises(ConfigError, match="eval_every"):
        OCDTrainingArguments(eval_every=0)
