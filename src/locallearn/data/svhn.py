"""SVHN cropped digits (``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``), registered as ``svhn`` and
``svhn_extra``.

Format (docs/data.md, "File formats"): MATLAB v5 files read with ``scipy.io.loadmat`` (the ``[svhn]`` extra,
imported only when a file is read). ``X`` is uint8 of shape (32, 32, 3, N), i.e. (H, W, C, N); ``y`` is (N, 1) with
labels 1..10 where **10 means digit 0** (torchvision applies ``y % 10``). We reorder X with axes (3, 2, 0, 1) to
(N, C, H, W) and remap 10 → 0.

``svhn`` uses the ``train`` split alone, as the papers do (InfoPro's ``train.py``: 73,257 train / 26,032 test
images, ``extra`` unused). ``svhn_extra`` is the same dataset with ``extra_32x32.mat`` (531,131 images) appended to
``train``; its test split is the ordinary one. Recipe (InfoPro's ``train.py``): random crop 32 with zero padding 2,
**no flip** (digits), Normalize(0.5, 0.5). Get the files from ``http://ufldl.stanford.edu/housenumbers/`` or with
``locallearn data get svhn --root data`` and point ``data.root`` at the folder holding them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import DatasetSpec, register_dataset
from .idx import DataError

URL = "http://ufldl.stanford.edu/housenumbers/"
_FILES = {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}
_FILES_EXTRA = {"train": ("train_32x32.mat", "extra_32x32.mat"), "test": ("test_32x32.mat",)}


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0..9 from one SVHN cropped-digits ``.mat`` file."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; download it from {URL} (or `locallearn data get svhn`)")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(
            f"{path}: reading SVHN .mat files needs scipy; install it with `pip install locallearn[svhn]`"
        ) from None
    try:
        mat = loadmat(str(path), variable_names=("X", "y"))
    except NotImplementedError as e:  # MATLAB v7.3 (HDF5) files: not the official format
        raise DataError(f"{path}: unsupported MATLAB file ({e}); fetch the official file again from {URL}") from None
    except Exception as e:  # a corrupt or truncated .mat fails in many ways (ValueError, TypeError, MatReadError...)
        msg = str(e).replace("\n", " ")
        raise DataError(f"{path}: not a readable .mat file ({type(e).__name__}: {msg}); fetch it again") from None
    if "X" not in mat or "y" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: expected variables X and y, found {found}; not an SVHN cropped-digits file")
    x, y = mat["X"], np.asarray(mat["y"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: X must be uint8 of shape (32, 32, 3, N), found {what}; fetch the file again")
    n = x.shape[3]
    if y.dtype.kind not in "iuf" or y.size != n:
        raise DataError(f"{path}: y must hold {n} numeric labels (one per image), found {y.dtype} {y.shape}")
    labels = y.reshape(-1)
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise DataError(f"{path}: y holds non-integer labels; wrong or corrupt file, fetch it again")
    labels = labels.astype(np.int64)
    if n and (int(labels.min()) < 1 or int(labels.max()) > 10):
        bad = int(labels.min()) if int(labels.min()) < 1 else int(labels.max())
        raise DataError(f"{path}: label {bad} outside 1..10 (10 = digit 0); wrong or corrupt file, fetch it again")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), labels % 10


def _reader(files: dict[str, tuple[str, ...]]):
    def read(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_mat(root / name) for name in files[split]]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    return read


for _name, _files, _what in (("svhn", _FILES, "train/test"), ("svhn_extra", _FILES_EXTRA, "train/extra/test")):
    register_dataset(
        DatasetSpec(
            name=_name,
            num_classes=10,
            channels=3,
            size=32,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pad=2,
            pad_mode="zero",
            flip=False,
            default_roots=("data/svhn",),
            read=_reader(_files),
            hint=f"download the {_what} *_32x32.mat files from {URL} (or run `locallearn data get {_name} "
            "--root data`) and set data.root to their folder",
        )
    )
