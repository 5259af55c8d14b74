"""The examples as a new user runs them: `timm_ocd.py --quick --random-init` on any timm architecture offline."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_idx(folder: Path, split: str, n: int, rng: np.random.Generator) -> None:
    """Random Fashion-MNIST-format idx files (gzipped, big-endian headers) for one split."""
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes())
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # trains a random resnet10t's classifier and an OCD head (a few seconds on a free core)
def test_timm_example_quick_random_init_calibrates_and_saves(tmp_path, capsys):
    pytest.importorskip("timm")
    rng = np.random.default_rng(0)
    write_idx(tmp_path, "train", 100, rng)
    write_idx(tmp_path, "t10k", 40, rng)
    example = load_example("timm_ocd")
    head = tmp_path / "head"
    argv = ["--model", "resnet10t", "--random-init", "--quick", "--data-dir", str(tmp_path), "--save", str(head)]
    example.main(argv)
    out = capsys.readouterr().out
    assert "64 train / 32 validation / 32 test images at 32px" in out
    assert "calibrated (delta_scale" in out and "| OCD x5 |" in out
    assert (head / "ocd_head.safetensors").exists()


def test_user_trials_run_the_readme_snippet_as_written(tmp_path):
    """benchmarks.user_trials reads the MiniLM snippet out of README.md: its edits must still apply."""
    from benchmarks import user_trials

    every = user_trials.trials(tmp_path)
    assert len({t.name for t in every}) == len(every)
    for t in every:
        if t.readme_edit is not None:
            code = user_trials.readme_snippet(tmp_path, t.readme_edit)
            compile(code, t.name, "exec")  # the README's block is valid Python after the edits
            assert f'"{tmp_path.as_posix()}/text/' in code and "../shared/data" not in code
            assert all(new in code for _, new in t.readme_edit)
    with pytest.raises(SystemExit, match="no longer contains 'layer=\"nowhere\"'"):
        user_trials.readme_snippet(tmp_path, (('layer="nowhere"', "x"),))


def test_user_trials_time_a_process_and_record_its_outcome(tmp_path):
    """A trial runs as its own process under a cap: exit status, timeout and output tail are recorded."""
    from benchmarks import user_trials

    script = tmp_path / "t.py"
    script.write_text("import sys, time\nprint('first')\nprint('last line')\nsys.exit(int(sys.argv[1]))\n")
    ok = user_trials.run_trial(user_trials.Trial("ok", "exits 0", (str(script), "0")), tmp_path)
    bad = user_trials.run_trial(user_trials.Trial("bad", "exits 3", (str(script), "3")), tmp_path)
    assert ok["returncode"] == 0 and ok["last_lines"][-1] == "last line" and ok["wall_s"] >= 0
    assert user_trials.outcome(ok) == "works" and user_trials.outcome(bad) == "failed (exit 3)"
    seen = user_trials.run_trial(user_trials.Trial("seen", "", (str(script), "0"), expect="first"), tmp_path)
    unseen = user_trials.run_trial(user_trials.Trial("unseen", "", (str(script), "0"), expect="2 process"), tmp_path)
    assert user_trials.outcome(seen) == "works"
    assert user_trials.outcome(unseen) == "exit 0, but it did not print '2 process'"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(30)\n")
    slow = user_trials.run_trial(user_trials.Trial("slow", "sleeps", (str(script),), timeout_s=2), tmp_path)
    assert slow["timed_out"] and user_trials.outcome(slow) == "hit the 2 s cap" and slow["wall_s"] < 20
    assert slow["stdout_tail"] == ["started"]  # what it printed before the cap is kept
    md = user_trials.to_markdown([ok, bad, slow], "cmd")
    assert md.count("\n| ") == 4 and "| bad | exits 3 |" in md
