"""The package's shape: no import circles, small classes, a lazy top level, heads saved by 0.1 still load,
settings / shapes / fitted values in their own records, and a wrapper that moves as one module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, SmallCNN
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from ocd_hf import OCDConfig, OCDTrainer, OCDTrainingArguments, OCDWrapper, register_adapter
from ocd_hf.config import ConfigError
from ocd_hf.constants import CONFIG_NAME, STATE_NAME
from ocd_hf.integrations import TorchAdapter, detect_family

SRC = Path(__file__).resolve().parents[1] / "src" / "ocd_hf"
LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_head_v0_1"


# ---------------------------------------------------------------------------------------------- import graph
def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """ocd_hf modules imported anywhere in the file (functions included), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            mod = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            for alias in node.names:
                found.add(f"{mod}.{alias.name}" if f"{mod}.{alias.name}" in MODULES else mod)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("."):
            # importlib.import_module(".name", package) in the lazy top level
            if f"ocd_hf{node.value}" in MODULES:
                found.add(f"ocd_hf{node.value}")
    return {m for m in found if m in MODULES and m != name}


MODULES = {_module_name(p) for p in SRC.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in SRC.rglob("*.py")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m.startswith("ocd_hf") and m != "ocd_hf" and n != "ocd_hf":
                if state.get(m) == 1:
                    return stack[stack.index(m) :] + [m]
                if m not in state and (c := visit(m)):
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles_in_src():
    graph = _graph()
    assert "ocd_hf.wrapper" in graph["ocd_hf"]  # the lazy top level is seen by the scan
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["ocd_hf.layers"] = graph["ocd_hf.layers"] | {"ocd_hf.wrapper"}
    assert _find_cycle(graph) is not None


def test_no_class_over_250_lines():
    sizes = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert max(sizes.values()) <= 250, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_import_is_lazy():
    code = (
        "import sys, ocd_hf; "
        "heavy = [m for m in ('diffusers', 'transformers', 'setfit', 'sklearn', 'accelerate') if m in sys.modules]; "
        "print(heavy); ocd_hf.OCDConfig; print(ocd_hf.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines()[0] == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import ocd_hf

        ocd_hf.nope  # noqa: B018


# ---------------------------------------------------------------------------------------------- legacy heads
def _legacy_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    model.load_state_dict(load_file(str(LEGACY / "base_model.safetensors")))
    return model.eval()


def test_head_saved_by_0_1_loads_with_identical_outputs(tmp_path):
    expected = load_file(str(LEGACY / "expected.safetensors"))
    ocd = OCDWrapper.from_pretrained(_legacy_model(), LEGACY / "head")
    assert ocd.delta_scale == 0.75 and ocd.shapes.weight_shape == (3, 12) and ocd.config.layer == "2"
    x = expected["inputs"]
    assert torch.equal(ocd(x, generator=torch.Generator().manual_seed(0)), expected["outputs"])
    assert torch.equal(ocd(x, num_samples=3, generator=torch.Generator().manual_seed(0)), expected["outputs_x3"])
    # re-saved, it is a current head with the same outputs
    folder = Path(ocd.save_pretrained(tmp_path / "resaved"))
    assert (folder / STATE_NAME).exists() and "weight_shape" not in json.loads((folder / CONFIG_NAME).read_text())
    again = OCDWrapper.from_pretrained(_legacy_model(), folder)
    assert torch.equal(again(x, generator=torch.Generator().manual_seed(0)), expected["outputs"])


def test_legacy_head_still_refuses_other_base_weights():
    model = _legacy_model()
    with torch.no_grad():
        model[2].weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="different weights"):
        OCDWrapper.from_pretrained(model, LEGACY / "head")


# ---------------------------------------------------------------------------------------------- settings
def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"OCDConfig.prediction_type='x0' .*one of \['epsilon', 'sample'"):
        OCDConfig(prediction_type="x0")
    with pytest.raises(ConfigError, match=r"num_inference_steps=0 is out of range"):
        OCDConfig(num_inference_steps=0)
    with pytest.raises(ConfigError, match=r"overfit_lr='fast' is not a valid value; expected float"):
        OCDConfig(overfit_lr="fast")
    with pytest.raises(ConfigError, match="num_folds"):
        OCDTrainingArguments(num_folds=1)


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        (CONFIG_NAME, lambda d: d.update(beta_schedule="bogus"), "beta_schedule='bogus'"),
        (CONFIG_NAME, lambda d: d.update(num_inference_steps=-3), "num_inference_steps=-3"),
        (STATE_NAME, lambda d: d["fitted"].update(delta_scale="big"), "delta_scale='big'"),
        (STATE_NAME, lambda d: d["fitted"].update(target_std=-1.0), "target_std=-1.0"),
        (STATE_NAME, lambda d: d.pop("shapes"), "lacks \\['shapes'\\]"),
        (STATE_NAME, lambda d: d.update(format_version=99), "format_version 99"),
    ],
)
def test_bad_saved_values_name_the_file(tmp_path, file, edit, message):
    ocd = OCDWrapper.from_pretrained(_legacy_model(), LEGACY / "head")
    folder = Path(ocd.save_pretrained(tmp_path / "head"))
    raw = json.loads((folder / file).read_text())
    edit(raw)
    (folder / file).write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message) as err:
        OCDWrapper.from_pretrained(_legacy_model(), folder)
    assert file in str(err.value)


def test_legacy_training_keywords_warn_and_still_apply(small_cnn, image_data):
    with pytest.warns(FutureWarning, match=r"\['num_train_steps'\] are training arguments now"):
        ocd = OCDWrapper.from_pretrained(small_cnn, layer="fc1", num_train_steps=4, **TINY_HEAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ocd.fit(image_data, loss="cross_entropy", progress=False)
    assert OCDTrainer.from_kwargs(ocd).args.num_train_steps == 4
    assert ocd.head is not None


# ---------------------------------------------------------------------------------------------- the wrapper
@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g))
    ocd = OCDWrapper.from_pretrained(model, layer="fc1", **TINY_HEAD)
    trainer = OCDTrainer(ocd, OCDTrainingArguments(num_train_steps=4, **TINY_TRAIN), loss="cross_entropy")
    trainer.train(data, eval_dataset=data)
    return ocd, model, data


def test_trainer_fills_the_records(fitted):
    ocd, model, _ = fitted
    assert ocd.shapes.weight_shape == (24, 64) and ocd.state.target_std > 0
    assert ocd.state.calibration is not None and ocd.state.collection == {"mode": "given data"}
    assert ocd.provenance.base_model == "SmallCNN" and ocd.provenance.base_model_library == "torch"
    assert "num_train_steps" not in OCDConfig().to_dict()


def test_double_moves_model_and_head_together(fitted):
    ocd, model, data = fitted
    import copy

    ocd = copy.deepcopy(ocd)
    ocd.double()
    base = ocd.model
    x = data.tensors[0][:3].double()
    assert base(x).dtype == torch.float64  # the whole base model was cast, not only the target layer
    assert ocd(x, generator=torch.Generator().manual_seed(0)).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in ocd.head.parameters())


def test_repr_names_layer_base_and_delta_scale(fitted):
    ocd, *_ = fitted
    text = repr(ocd)
    assert "'fc1' (Linear (24, 64))" in text and "SmallCNN" in text and f"delta_scale={ocd.delta_scale:g}" in text
    assert "calibrated" in text and len(text.splitlines()) == 5


def test_register_adapter_serves_a_new_family():
    class Doubler(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, batch):
            return self.fc(batch["features"]) * 2

    class DoublerAdapter(TorchAdapter):
        family = "doubler"

    register_adapter("doubler", lambda m: isinstance(m, Doubler), DoublerAdapter)
    try:
        assert detect_family(Doubler()) == "doubler"
        ocd = OCDWrapper.from_pretrained(Doubler(), layer="fc")
        assert isinstance(ocd.adapter, DoublerAdapter)
    finally:
        register_adapter("doubler", lambda m: False, DoublerAdapter)
    assert detect_family(Doubler()) == "torch"


def test_wrong_layer_lists_candidates(small_cnn):
    with pytest.raises(ValueError, match=r"No layer named 'fc9'.*Candidate layers: \['conv', 'fc1', 'fc2'\]"):
        OCDWrapper.from_pretrained(small_cnn, layer="fc9")
