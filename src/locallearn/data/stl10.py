"""STL-10 binary version (``stl10_binary/{train,test}_{X,y}.bin``), registered as ``stl10``.

Format (docs/data.md, "File formats"): ``*_X.bin`` is raw uint8, 3·96·96 = 27,648 bytes per image, each channel
plane stored **column-major**; read as (N, 3, 96, 96) and swap the last two axes. ``*_y.bin`` is one uint8 label per
image in 1..10, minus 1 gives 0..9. Sizes are checked (a whole number of images, as many labels as images, labels in
range) rather than assumed (5,000 train / 8,000 test).

Only the labelled ``train`` and ``test`` splits are read, as in the papers' scripts. The 100k ``unlabeled_X.bin``
split is out of scope here (it would need a streaming loader); ``fold_indices.txt`` is not used either (the papers
train on all 5,000 images). Recipe (InfoPro's ``train.py``; docs/data.md): random crop 96 with padding 4, horizontal
flip, Normalize(0.5, 0.5).

Get ``stl10_binary.tar.gz`` from ``http://ai.stanford.edu/~acoates/stl10/`` (or ``locallearn data get stl10
--root data``), extract it, and point ``data.root`` at the folder holding ``stl10_binary`` or at that folder itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import DatasetSpec, register_dataset
from .idx import DataError

URL = "http://ai.stanford.edu/~acoates/stl10/"
FOLDER = "stl10_binary"
SIZE = 96
IMAGE_BYTES = 3 * SIZE * SIZE


def _read_bytes(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: file not found; download stl10_binary.tar.gz from {URL} and extract it")
    return np.fromfile(path, dtype=np.uint8)


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 96, 96) uint8 (row-major) and labels (N,) int64 in 0..9 of one labelled split."""
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    raw = _read_bytes(x_path)
    if not raw.size or raw.size % IMAGE_BYTES:
        raise DataError(
            f"{x_path}: {raw.size} bytes is not a whole number of {IMAGE_BYTES}-byte images (3×96×96); "
            "the file is truncated or corrupt, fetch it again"
        )
    labels = _read_bytes(y_path)
    n = raw.size // IMAGE_BYTES
    if labels.size != n:
        raise DataError(
            f"{y_path}: {labels.size} labels but {x_path} holds {n} images; the files do not match "
            "(one is truncated, or they come from different splits), fetch them again"
        )
    if int(labels.min()) < 1 or int(labels.max()) > 10:
        bad = int(labels.min()) if int(labels.min()) < 1 else int(labels.max())
        raise DataError(f"{y_path}: label {bad} outside 1..10; wrong or corrupt label file, fetch it again")
    # Column-major planes: element (c, col, row) sits where a row-major reshape puts (c, row, col).
    images = np.ascontiguousarray(raw.reshape(n, 3, SIZE, SIZE).transpose(0, 1, 3, 2))
    return images, labels.astype(np.int64) - 1


def read(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``read_split`` in ``root/stl10_binary`` if it holds the split, else in ``root`` itself."""
    for folder in (root / FOLDER, root):
        if (folder / f"{split}_X.bin").is_file():
            return read_split(folder, split)
    raise DataError(
        f"{root / FOLDER / f'{split}_X.bin'}: file not found (nor in {root}); download stl10_binary.tar.gz from "
        f"{URL} (or run `locallearn data get stl10 --root data`), extract it and set data.root"
    )


register_dataset(
    DatasetSpec(
        name="stl10",
        num_classes=10,
        channels=3,
        size=SIZE,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        pad=4,
        pad_mode="zero",
        flip=True,
        default_roots=("data/stl10",),
        read=read,
        hint=f"download stl10_binary.tar.gz from {URL} (or run `locallearn data get stl10 --root data`), "
        "extract it and set data.root to the folder holding stl10_binary",
    )
)
