"""The benchmarks' offline data: readers for the files under the data root, seeded disjoint splits.

The data root (../shared/data from the project root) holds vision/fashion-mnist/ (the four idx files),
tabular/california_housing.csv.gz and text/womens_clothing_reviews.csv.gz.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

FASHION_DIR = Path("vision") / "fashion-mnist"
CALIFORNIA_CSV = Path("tabular") / "california_housing.csv.gz"
CALIFORNIA_TARGET = "MedHouseVal"
REVIEWS_CSV = Path("text") / "womens_clothing_reviews.csv.gz"


def require(path: Path) -> Path:
    """`path`, or a FileNotFoundError that says which data root is expected.

    Args:
        path: a file under the data root.
    """
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Pass --data-root with the folder that holds {FASHION_DIR}/, {CALIFORNIA_CSV} and "
            f"{REVIEWS_CSV} (from the project root: ../shared/data)."
        )
    return path


def split_indices(n: int, counts: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes out of range(n) (seeded).

    Args:
        n: the number of rows to draw from.
        counts: the size of each index set.
        seed: seeds the permutation.
    """
    if sum(counts) > n:
        raise ValueError(f"Cannot draw {counts} (total {sum(counts)}) disjoint samples out of {n}.")
    perm = np.random.default_rng(seed).permutation(n)
    ends = np.cumsum((0,) + tuple(counts))
    return [perm[a:b] for a, b in zip(ends[:-1], ends[1:])]


def read_idx(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (uint8, N x 28 x 28) and labels of one split from its gzipped idx files.

    Args:
        folder: the folder with {split}-images-idx3-ubyte.gz and {split}-labels-idx1-ubyte.gz.
        split: "train" or "t10k".
    """
    images = require(folder / f"{split}-images-idx3-ubyte.gz")
    labels = require(folder / f"{split}-labels-idx1-ubyte.gz")
    x = np.frombuffer(gzip.open(images).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(labels).read(), np.uint8, offset=8)
    return x, y


def image_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """uint8 images and labels -> a TensorDataset of float images in [0, 1] (N x 1 x H x W) and int64 labels.

    Args:
        x: images, N x H x W.
        y: class labels, N.
    """
    return TensorDataset(
        torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(y.astype(np.int64))
    )


def read_california(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """California housing: the 8 features and the target MedHouseVal (units of $100k), float32.

    Args:
        path: the CSV (optionally gzipped) with the feature columns and MedHouseVal.
    """
    import pandas as pd

    df = pd.read_csv(require(path))
    if CALIFORNIA_TARGET not in df.columns:
        raise ValueError(f"{path} has no {CALIFORNIA_TARGET!r} column (columns: {list(df.columns)}).")
    return df.drop(columns=[CALIFORNIA_TARGET]).to_numpy(np.float32), df[CALIFORNIA_TARGET].to_numpy(np.float32)


def read_reviews(path: Path) -> tuple[list[str], list[int]]:
    """The clothing reviews, de-duplicated by text: (texts, ratings 1-5 as classes 0-4).

    Args:
        path: the CSV (optionally gzipped) with the columns text and rating.
    """
    import pandas as pd

    df = pd.read_csv(require(path))[["text", "rating"]].dropna()
    df = df.drop_duplicates("text").reset_index(drop=True)  # disjoint splits by content, not only by row
    return df["text"].astype(str).tolist(), (df["rating"].astype(int) - 1).tolist()


def few_shot(texts: list[str], labels: list[int], shots: int, seed: int) -> tuple[list[str], list[int]]:
    """`shots` random examples of every class, in a random order.

    Args:
        texts: the pool of texts.
        labels: their class labels.
        shots: examples per class (fewer where a class has fewer).
        seed: seeds the draw and the order.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)])
    idx = rng.permutation(idx)
    return [texts[i] for i in idx], labels[idx].tolist()


def tensors_of(ds: Dataset) -> tuple[torch.Tensor, ...]:
    """The tensors of a TensorDataset, of a Subset of one, or of any dataset of tensor tuples.

    Args:
        ds: the dataset.
    """
    if isinstance(ds, TensorDataset):
        return ds.tensors
    if isinstance(ds, Subset):
        idx = torch.as_tensor(list(ds.indices), dtype=torch.long)
        return tuple(t[idx] for t in tensors_of(ds.dataset))
    rows = [ds[i] for i in range(len(ds))]
    return tuple(torch.stack([torch.as_tensor(v) for v in col]) for col in zip(*rows))
