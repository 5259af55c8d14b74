"""`fit` under two real processes (torchrun, gloo on CPU): one shared collection, one head.

The test launches this file as a script with `torchrun --nproc_per_node 2` (ACCELERATE_USE_CPU=true, one
thread per process). Each rank runs `ocd.fit(...)` without `collect_dir` on a small MLP and writes what it
saw to a JSON file: the collection folder, the sample indices the collection holds and a hash of the head.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NUM_SAMPLES = 24


def _worker(out_dir: Path) -> None:
    import torch
    from accelerate import Accelerator
    from torch import nn

    from ocd_hf import OCDWrapper
    from ocd_hf.trainer import OCDTrainer

    torch.set_num_threads(1)
    acc = Accelerator()
    seen: dict = {}
    train_head = OCDTrainer.train_head

    def record(self, store):  # what the head is trained on, read by every rank
        seen["collect_dir"] = str(store.path)
        seen["index"] = store.column("index").tolist()
        seen["delta_sum"] = float(store.column("delta").double().sum())
        return train_head(self, store)

    OCDTrainer.train_head = record
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(NUM_SAMPLES, 6, generator=g), torch.arange(NUM_SAMPLES) % 3)
    ocd = OCDWrapper.from_pretrained(model, layer="2", block_out_channels=(16, 16, 32), cond_hidden_dim=16)
    ocd.fit(
        data,
        "cross_entropy",
        accelerator=acc,
        batch_size=4,
        shard_size=4,  # six shards: both ranks collect some
        num_train_steps=6,
        train_batch_size=8,
        progress=False,
    )
    h = hashlib.sha256()
    for k, v in sorted(ocd.head.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    acc.wait_for_everyone()  # rank 0 has removed the temporary collection by now
    seen.update(
        rank=acc.process_index,
        num_processes=acc.num_processes,
        head_sha256=h.hexdigest(),
        collect_dir_exists=os.path.exists(seen["collect_dir"]),
    )
    (out_dir / f"rank{acc.process_index}.json").write_text(json.dumps(seen))


def test_fit_on_two_processes_shares_one_collection_and_trains_one_head(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not found next to the Python interpreter")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["num_processes"] for r in ranks} == {2}
    # one shared folder, removed after training
    assert ranks[0]["collect_dir"] == ranks[1]["collect_dir"]
    assert not any(r["collect_dir_exists"] for r in ranks)
    # every sample collected exactly once, and both ranks read the same collection
    for r in ranks:
        assert sorted(r["index"]) == list(range(NUM_SAMPLES))
    assert ranks[0]["delta_sum"] == ranks[1]["delta_sum"]
    # one head: the same weights on both ranks
    assert ranks[0]["head_sha256"] == ranks[1]["head_sha256"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
