"""Fault campaign: kill -9 during collection, training and saving; byte flips in a saved head; edits of
every saved key; malicious pickles in a checkpoint; concurrent collectors. Prints trials / held / failed
per kind and writes them as JSON.

    OMP_NUM_THREADS=1 python -m benchmarks.fault_campaign --out /tmp/faults.json [--quick]

"held" means the promise of docs/sharing.md ("What is checked at load, what survives a kill") was kept:
a killed run resumed to a result bitwise identical to an uninterrupted one, a damaged head was refused
with an error naming the file, an edited key was refused or reported, no planted pickle ran.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "fixtures" / "legacy_head_v0_1"

WORKER = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
import fault_campaign as fc
mode, args = sys.argv[1], json.loads(sys.argv[3])
print("ready", flush=True)
getattr(fc, "run_" + mode)(**args)
print("finished", flush=True)
"""


# ---------------------------------------------------------------------------------------------- workloads
def setup(n: int = 64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return model, data


def run_collect(out: str, shard_size: int = 4, lr: float = 5e-4, slow: float = 0.0) -> None:
    from ocd_hf.collection import collect_deltas
    from ocd_hf.integrations import TorchAdapter
    from ocd_hf.losses import cross_entropy
    from ocd_hf.overfit import OverfitSettings

    model, data = setup()
    a = TorchAdapter(model)

    def forward(m, x):
        time.sleep(slow)
        return a.forward(m, x)

    collect_deltas(
        model,
        "2",
        data,
        cross_entropy,
        out,
        OverfitSettings(lr=lr),
        split_batch=a.split_batch,
        forward_fn=forward,
        batch_size=4,
        shard_size=shard_size,
        progress=False,
    )


def run_train(store: str, out: str, result: str | None = None, steps: int = 40) -> None:
    from ocd_hf import OCDConfig, OCDTrainingArguments
    from ocd_hf.collection import DeltaStore
    from ocd_hf.head import OCDHead
    from ocd_hf.state import HeadShapes
    from ocd_hf.training import train_head

    s = DeltaStore(store)
    row = s[0]
    shapes = HeadShapes(
        tuple(s.weight_shape),
        tuple(s.target_shape),
        row["layer_input"].numel(),
        row["layer_output"].numel(),
        row["model_output"].numel(),
    )
    cfg = OCDConfig(layer="2", block_out_channels=(16, 16, 32), cond_hidden_dim=16, scale_hidden_dim=16)
    args = OCDTrainingArguments(
        num_train_steps=steps, train_batch_size=16, output_dir=out, checkpoint_every=2, progress=False
    )
    torch.manual_seed(0)
    head = OCDHead(cfg, shapes)
    train_head(head, s, cfg, args)
    if result:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, result)


def legacy_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    model.load_state_dict(load_file(str(LEGACY / "base_model.safetensors")))
    return model.eval()


def load_head(folder, **kw):
    from ocd_hf import OCDWrapper

    return OCDWrapper.from_pretrained(legacy_model(), folder, **kw)


def run_save(target: str, times: int = 1000) -> None:
    ocd = load_head(LEGACY / "head")
    for _ in range(times):
        ocd.save_pretrained(target)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_save_injected(target: str, point: str) -> None:
    """Save once, killing this process at `point`: before the first or second rename, or before the old
    head is removed."""
    from ocd_hf import serialization

    ocd = load_head(LEGACY / "head")
    calls = {"n": 0}
    rename, rmtree = os.rename, shutil.rmtree

    def renamed(a, b):
        calls["n"] += 1
        if point == f"rename-{calls['n']}":
            _die()
        rename(a, b)

    def removed(path, *args, **kw):
        if point == "rmtree-old" and ".old-" in str(path):
            _die()
        rmtree(path, *args, **kw)

    serialization.os.rename = renamed
    serialization.shutil.rmtree = removed
    ocd.save_pretrained(target)


def run_train_injected(store: str, out: str, point: str, at_step: int) -> None:
    """Train, killing this process inside the checkpoint of `at_step`: after accelerate's files, after the
    EMA file, or while `done` is written (its temporary file exists, not yet renamed)."""
    from ocd_hf import training

    save_file, atomic_write = training.save_file, training._atomic_write

    def saving(tensors, path, *a, **kw):
        if point == "before-ema" and f"step-{at_step}" in str(path):
            _die()
        save_file(tensors, path, *a, **kw)

    def writing(path, text):
        if point == "done" and f"step-{at_step}" in str(path):
            Path(path).with_name(".done.tmp-x").write_text(text[: len(text) // 2])
            _die()
        atomic_write(path, text)

    training.save_file, training._atomic_write = saving, writing
    run_train(store, out)


# ---------------------------------------------------------------------------------------------- harness
def spawn(mode: str, **args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, str(Path(__file__).parent), json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL `proc` `delay` s after it is ready; False when it finished first."""
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def timed(mode: str, **args) -> float:
    proc = spawn(mode, **args)
    assert proc.stdout.readline().strip() == "ready"
    t = time.perf_counter()
    proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    return time.perf_counter() - t


def same_store(a: Path, b: Path) -> bool:
    from ocd_hf.collection import DeltaStore

    sa, sb = DeltaStore(a), DeltaStore(b)
    return all(torch.equal(sa.column(k), sb.column(k)) for k in ("delta", "scale", "layer_input", "index"))


def debris(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def campaign(work: Path, n_kill: int, n_flip: int, rng: random.Random, only: str = "all") -> dict[str, dict]:
    res: dict[str, dict] = {}

    def record(kind: str, ok: bool, note: str = "", killed: bool | None = None) -> None:
        r = res.setdefault(kind, {"trials": 0, "held": 0, "failed": 0, "notes": []})
        r["trials"] += 1
        if killed is not None:  # kill trials: how many were killed before the run finished on its own
            r["killed_mid_run"] = r.get("killed_mid_run", 0) + int(killed)
        r["held" if ok else "failed"] += 1
        if not ok and note:
            r["notes"].append(note[:300])

    # collection kills
    ref = work / "collect-ref"
    t_collect = timed("collect", out=str(ref), slow=0.02)
    for i in range(n_kill):
        out = work / f"collect-{i}"
        killed = kill_after(spawn("collect", out=str(out), slow=0.02), rng.uniform(0, 0.8 * t_collect))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_collect(str(out), slow=0.0)
            record("kill during collection", same_store(ref, out), f"trial {i} differs", killed)
        except Exception as e:
            record("kill during collection", False, f"trial {i} (killed={killed}): {type(e).__name__}: {e}")

    if only == "collection":
        return res

    # training kills
    tref = work / "train-ref"
    t_train = timed("train", store=str(ref), out=str(tref), result=str(work / "train-ref.safetensors"))
    expected = load_file(str(work / "train-ref.safetensors"))
    for i in range(n_kill):
        out = work / f"train-{i}"
        killed = kill_after(spawn("train", store=str(ref), out=str(out)), rng.uniform(0, t_train))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_train(str(ref), str(out), result=str(out / "final.safetensors"))
            got = load_file(str(out / "final.safetensors"))
            same = all(torch.equal(got[k], expected[k]) for k in expected)
            record("kill during training", same, f"trial {i}", killed)
        except Exception as e:
            record("kill during training", False, f"trial {i}: {type(e).__name__}: {e}")

    # kills injected at exact points of a checkpoint
    for i, (point, step) in enumerate([(p, st) for p in ("before-ema", "done") for st in (4, 10)]):
        out = work / f"train-inj-{i}"
        proc = spawn("train_injected", store=str(ref), out=str(out), point=point, at_step=step)
        proc.wait()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_train(str(ref), str(out), result=str(out / "final.safetensors"))
            got = load_file(str(out / "final.safetensors"))
            same = all(torch.equal(got[k], expected[k]) for k in expected)
            record("kill injected in a checkpoint", same, f"{point}@{step}", proc.returncode == -signal.SIGKILL)
        except Exception as e:
            record("kill injected in a checkpoint", False, f"{point}@{step}: {type(e).__name__}: {e}")

    # malicious pickles in a checkpoint
    marker = work / "pwned"
    for i, name in enumerate(["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"]):
        out = work / f"pickle-{i}"
        shutil.copytree(tref, out)
        ckpt = sorted((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))[-1]
        with open(ckpt / name, "wb") as f:
            pickle.dump(_Marker(str(marker)), f)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_train(str(ref), str(out), result=str(out / "final.safetensors"))
            got = load_file(str(out / "final.safetensors"))
            ok = not marker.exists() and all(torch.equal(got[k], expected[k]) for k in expected)
        except Exception as e:
            ok = not marker.exists() and "failed to load" in str(e)
        record("malicious pickle in checkpoint", ok, f"{name}: marker={marker.exists()}")

    # save kills
    target = work / "saves" / "head"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ocd = load_head(LEGACY / "head")
        ocd.save_pretrained(target)
        x = load_file(str(LEGACY / "expected.safetensors"))
        ref_out = ocd(x["inputs"], generator=torch.Generator().manual_seed(0))

    def reload_and_resave() -> tuple[bool, list[str]]:
        """After a killed save: whether the head at `target` loads with the reference outputs and saves
        again, and which side folders are left beside it."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_head(target)
            same = torch.equal(loaded(x["inputs"], generator=torch.Generator().manual_seed(0)), ref_out)
            loaded.save_pretrained(target)
        return same, debris(target.parent, "head")

    for i in range(n_kill):
        killed = kill_after(spawn("save", target=str(target)), rng.uniform(0.5, 2.5))
        try:
            same, left = reload_and_resave()
            record("kill during save", same and not left, f"trial {i}: same={same} debris={left}", killed)
        except Exception as e:
            record("kill during save", False, f"trial {i}: {type(e).__name__}: {e}")

    # kills injected at exact points of a save
    for point in ("rename-1", "rename-2", "rmtree-old"):
        for _ in range(2):
            proc = spawn("save_injected", target=str(target), point=point)
            proc.wait()
            try:
                same, left = reload_and_resave()
                note = f"{point}: same={same} debris={left}"
                record("kill injected in a save", same and not left, note, proc.returncode == -signal.SIGKILL)
            except Exception as e:
                record("kill injected in a save", False, f"{point}: {type(e).__name__}: {e}")

    # byte flips
    head = target
    data = (head / "ocd_head.safetensors").read_bytes()
    for i in range(n_flip):
        pos = rng.randrange(len(data))
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        trial = work / f"flip-{i}"
        shutil.copytree(head, trial)
        (trial / "ocd_head.safetensors").write_bytes(bytes(flipped))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load_head(trial)
            record("byte flip in ocd_head.safetensors", False, f"flip at {pos} loaded")
        except (OSError, ValueError) as e:
            record("byte flip in ocd_head.safetensors", "ocd_head.safetensors" in str(e), str(e))

    # config edits: delete every saved key; bad values
    from ocd_hf.config import ConfigError

    def edits():
        for file in ("ocd_config.json", "ocd_state.json"):
            d = json.loads((head / file).read_text())
            for k, v in d.items():
                yield file, f"delete {k}", lambda d, k=k: d.pop(k), k
                if isinstance(v, dict) and k in ("shapes", "provenance", "fitted"):
                    for kk in v:
                        yield file, f"delete {k}.{kk}", lambda d, k=k, kk=kk: d[k].pop(kk), kk
        bad = [
            ("num_inference_steps", -3),
            ("num_inference_steps", 0),
            ("num_inference_steps", "10"),
            ("beta_schedule", "bogus"),
            ("guidance_scale", "big"),
            ("layer", 3),
            ("task", "ranking"),
        ]
        for k, v in bad:
            yield "ocd_config.json", f"{k}={v!r}", lambda d, k=k, v=v: d.update({k: v}), k
        yield (
            "ocd_state.json",
            "layer_fingerprint=null",
            lambda d: d["provenance"].update(layer_fingerprint=None),
            "layer_fingerprint",
        )
        yield "ocd_state.json", "head_sha256=0*64", lambda d: d.update(head_sha256="0" * 64), "ocd_head.safetensors"
        yield "ocd_state.json", "delta_scale='x'", lambda d: d["fitted"].update(delta_scale="x"), "delta_scale"

    for i, (file, what, fn, key) in enumerate(edits()):
        trial = work / f"edit-{i}"
        shutil.copytree(head, trial)
        d = json.loads((trial / file).read_text())
        fn(d)
        (trial / file).write_text(json.dumps(d))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                load_head(trial)
            said = [str(w.message) for w in caught if key in str(w.message)]
            # loading is acceptable only with a warning naming the key (e.g. target_std null)
            record("config edit", bool(said), f"{file}: {what} loaded silently")
        except (ConfigError, OSError, ValueError) as e:
            record("config edit", key in str(e) and (file in str(e) or "safetensors" in str(e)), f"{what}: {e}")

    # concurrent collectors: same settings (must split the work), different settings (one refused)
    ref4 = work / "collect-ref"
    for i in range(max(2, n_kill // 2)):
        out = work / f"conc-{i}"
        procs = [spawn("collect", out=str(out), slow=0.002) for _ in range(2)]
        codes = [p.wait() for p in procs]
        ok = codes == [0, 0] and same_store(ref4, out) and not [p for p in out.iterdir() if ".tmp" in p.name]
        record("2 concurrent collectors, same settings", ok, f"codes={codes}")
    for i in range(2):
        out = work / f"conc-diff-{i}"
        procs = [spawn("collect", out=str(out), slow=0.002, lr=lr) for lr in (5e-4, 1e-2)]
        outs = [(p.wait(), p.stderr.read()) for p in procs]
        refused = [c for c, err in outs if c != 0 and "other settings" in err]
        record("2 concurrent collectors, other settings", len(refused) == 1, f"codes={[c for c, _ in outs]}")
    return res


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fault_campaign.json")
    ap.add_argument("--quick", action="store_true", help="3 kills and 10 flips per kind")
    ap.add_argument("--kills", type=int, default=10, help="random kills per kind (collection, training, save)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["all", "collection"], default="all", help="collection: only its kill trials")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ocd-faults-") as tmp:
        res = campaign(Path(tmp), 3 if a.quick else a.kills, 10 if a.quick else 40, random.Random(a.seed), a.only)
    total = {k: sum(r[k] for r in res.values()) for k in ("trials", "held", "failed")}
    print(f"{'kind':45s} trials  held  failed  killed mid-run")
    for kind, r in res.items():
        print(f"{kind:45s} {r['trials']:6d} {r['held']:5d} {r['failed']:7d}  {r.get('killed_mid_run', '')}")
        for note in r["notes"]:
            print("    failed:", note)
    print(
        f"{'total':45s} {total['trials']:6d} {total['held']:5d} {total['failed']:7d}  ({time.perf_counter() - t0:.0f} s)"
    )
    Path(a.out).write_text(json.dumps({"seed": a.seed, "quick": a.quick, "kinds": res, "total": total}, indent=2))


if __name__ == "__main__":
    main()
