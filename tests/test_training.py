import torch
from conftest import TINY_HEAD, TINY_TRAIN, shapes_of

from ocd_hf import OCDConfig, OCDTrainingArguments
from ocd_hf.collection import collect_deltas
from ocd_hf.head import OCDHead
from ocd_hf.integrations import TorchAdapter
from ocd_hf.losses import cross_entropy
from ocd_hf.training import latest_checkpoint, train_head


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
    (tmp_path / "checkpoints" / "step-20").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-20" / "done").write_text('{"step": 20}')
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
