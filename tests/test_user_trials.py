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
