"""`OCDHead.compile`: sampling through torch.compile'd networks that share the originals' weights."""

import copy
import warnings

import pytest
import torch
from conftest import TINY_HEAD, TINY_TRAIN, SmallCNN
from torch.utils.data import TensorDataset

from ocd_hf import OCDWrapper

pytestmark = pytest.mark.filterwarnings("ignore:Sampled deltas:RuntimeWarning")


def _fitted():
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g))
    torch.manual_seed(0)
    ocd = OCDWrapper.from_pretrained(SmallCNN(), layer="fc1", **TINY_HEAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # uncalibrated
        ocd.fit(data, loss="cross_entropy", batch_size=12, num_train_steps=3, **TINY_TRAIN)
    ocd.distill(data, num_steps=2, batch_size=8, num_draws=2, progress=False)
    return ocd, data.tensors[0][:4]


def test_compile_changes_no_weight_and_survives_copy_and_save(tmp_path):
    ocd, _ = _fitted()
    before = {k: v.clone() for k, v in ocd.head.state_dict().items()}
    ocd.save_pretrained(tmp_path / "eager")
    ocd.head.compile(dynamic=False)
    # compilation is lazy: nothing is compiled or registered until a sampler runs
    assert ocd.head.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in ocd.head.state_dict().items())
    assert copy.deepcopy(ocd).head.compile_options == {"dynamic": False}
    ocd.save_pretrained(tmp_path / "compiled")
    eager, compiled = (tmp_path / d / "ocd_head.safetensors" for d in ("eager", "compiled"))
    assert eager.read_bytes() == compiled.read_bytes()


@pytest.mark.slow
def test_compiled_samplers_match_eager():
    ocd, x = _fitted()
    ref = {}
    for sampler in ("distilled", "ddim"):
        ocd.config = ocd.config.replace(sampler=sampler)
        ref[sampler] = ocd(x, generator=torch.Generator().manual_seed(3))
    ocd.head.compile(dynamic=False)
    for sampler in ("distilled", "ddim"):
        ocd.config = ocd.config.replace(sampler=sampler)
        out = ocd(x, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(out, ref[sampler], rtol=1e-4, atol=1e-5)
    # a new student (distill again) gets its own compiled copy
    student = ocd.head.student
    ocd.head.add_student(ocd.head.student_guidance)
    assert ocd.head.student is not student
    ocd.config = ocd.config.replace(sampler="distilled")
    ocd(x)
    assert id(ocd.head.student) in ocd.head._compiled and id(student) not in ocd.head._compiled
