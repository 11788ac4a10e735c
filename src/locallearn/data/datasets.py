"""Dataset registry: name → reader, class count, normalisation and augmentation recipe (docs/data.md).

The class count is a property of the dataset, never inferred from its name (InfoPro's ``'sl10'`` typo gave STL-10 a
100-way head). Readers return uint8 NCHW arrays, so the loader can keep them resident on the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..names import unknown_name
from .idx import DataError, read_idx_split


@dataclass(frozen=True)
class DatasetSpec:
    """``read(root, split)`` returns (uint8 images, labels) for classification. ``task``: ``classification`` or
    ``super_resolution``; an SR dataset's ``read(root, split, scale=, limit=, test_root=)`` returns image pairs
    (:mod:`locallearn.data.sr`), and its ``size`` is only the side of the probe input used to check a split."""

    name: str
    num_classes: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int
    pad_mode: str
    flip: bool
    default_roots: tuple[str, ...]
    read: Callable[..., Any]
    hint: str
    task: str = "classification"
    # Streamed datasets (class folders, :mod:`locallearn.data.imagefolder`): builds the (train, test) loaders and
    # the spec with the class count found in the files; ``read`` then only explains that.
    loaders: Callable[..., Any] | None = None
    classes: tuple[str, ...] = ()  # class names where the files give them (detection: VOC/COCO categories)


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    _DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    if name not in _DATASETS:
        raise ValueError(unknown_name("dataset", name, _DATASETS))
    return _DATASETS[name]


def find_root(spec: DatasetSpec, root: str | None) -> Path:
    """``data.root`` if given, else the first default location holding the files (e.g. the Debian package's)."""
    if root:
        return Path(os.path.expanduser(root))
    for candidate in spec.default_roots:
        if Path(candidate).is_dir():
            return Path(candidate)
    raise DataError(f"{spec.name}: no data.root given and none of {', '.join(spec.default_roots)} exists; {spec.hint}")


def load_split(name: str, root: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) of ``split`` in {"train", "test"}."""
    spec = dataset_spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} of {name}; use 'train' or 'test'")
    return spec.read(find_root(spec, root), split)


def _idx_reader(num_classes: int, hint: str) -> Callable[[Path, str], tuple[np.ndarray, np.ndarray]]:
    def read(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        return read_idx_split(root, {"train": "train", "test": "t10k"}[split], num_classes, hint)

    return read


_FMNIST_HINT = (
    "install it with `apt-get install -y dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist) or set data.root to a folder with the four IDX files"
)
register_dataset(
    DatasetSpec(
        name="fashion_mnist",
        num_classes=10,
        channels=1,
        size=28,
        mean=(0.2860,),
        std=(0.3530,),
        pad=2,
        pad_mode="zero",
        flip=True,
        default_roots=("/usr/share/datasets/fashion-mnist", "data/fashion-mnist"),
        read=_idx_reader(10, _FMNIST_HINT),
        hint=_FMNIST_HINT,
    )
)

_MNIST_HINT = "set data.root to a folder with train-images-idx3-ubyte.gz and the three other MNIST IDX files"
register_dataset(
    DatasetSpec(
        name="mnist",
        num_classes=10,
        channels=1,
        size=28,
        mean=(0.1307,),
        std=(0.3081,),
        pad=2,
        pad_mode="zero",
        flip=False,
        default_roots=("/usr/share/datasets/mnist", "data/mnist"),
        read=_idx_reader(10, _MNIST_HINT),
        hint=_MNIST_HINT,
    )
)
