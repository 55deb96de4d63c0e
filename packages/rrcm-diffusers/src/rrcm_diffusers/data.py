"""Loaders for the image sets in ``../shared/data/images`` (see that folder's README).

Images come back as uint8 tensors (N, C, H, W) and int64 labels; ``to_model_space``
maps them to the [-1, 1] pixels the model sees.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from ._checks import DATASETS

DATA_LAYOUT = "images/mnist and images/cifar10"  # what the shared data folder holds for this package


def default_data_dir() -> Path:
    """``$RRCM_DATA_DIR``, else ``../shared/data`` relative to the working directory."""
    path = Path(os.environ.get("RRCM_DATA_DIR", Path.cwd().parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder not found: {path}. Point RRCM_DATA_DIR at the shared data folder "
            f"(the one holding {DATA_LAYOUT})."
        )
    return path


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"expected data file {path} (see the data README for the layout)")
    return path


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(_need(path), "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(split: str, data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``split="train"``: the 5,000-digit CSV; ``"test"``: the 10,000 t10k digits. (N, 1, 28, 28)."""
    root = Path(data_dir or default_data_dir()) / "images" / "mnist"
    if split == "train":
        with gzip.open(_need(root / "mnist-train-5k.csv.gz"), "rt") as f:
            arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
        images, labels = arr[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28), arr[:, 784]
    elif split == "test":
        images = _read_idx(root / "t10k-images-idx3-ubyte.gz").reshape(-1, 1, 28, 28)
        labels = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def load_cifar10(split: str, data_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``"train"``: 10,000 images; ``"test"``: 1,000. (N, 3, 32, 32)."""
    root = Path(data_dir or default_data_dir()) / "images" / "cifar10"
    name = {"train": "cifar10-train-10k.npz", "test": "cifar10-test-1k.npz"}.get(split)
    if name is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    with np.load(_need(root / name), allow_pickle=False) as z:
        images, labels = z["images"].transpose(0, 3, 1, 2), z["labels"].astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def load_dataset(
    name: str, split: str, data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    loaders = {"mnist": load_mnist, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    return loaders[name](split, data_dir)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1] (mean = std = 0.5 normalisation)."""
    return images.float().div(127.5).sub(1.0)


def strided_class_subset(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of ``per_class`` images per class, evenly strided through each class (sorted)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1 (images per class), got {per_class!r}")
    picks = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if per_class > idx.numel():
            raise ValueError(f"per_class={per_class} exceeds the {idx.numel()} images of class {c}")
        stride = idx.numel() / per_class
        picks.append(idx[(torch.arange(per_class) * stride).long()])
    return torch.cat(picks).sort().values
