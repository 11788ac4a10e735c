"""MNIST-family IDX files (``train-images-idx3-ubyte[.gz]`` ...), read with numpy and validated.

Format: big-endian header ``0x0000 08 NDIM`` (uint8 data), then NDIM big-endian uint32 sizes, then the data.
Every problem raises :class:`DataError`, a one-line message naming the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A dataset file is missing, truncated or malformed (one line: file, problem, fix)."""


def read_idx(path: Path, expect_ndim: int) -> np.ndarray:
    """Read one uint8 IDX file (raw or gzip) into an array, checking magic, dimensions and size."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot decompress ({e}); the file is corrupt, fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{path}: not a uint8 IDX file (bad magic number {raw[:4].hex() or 'empty'}); fetch the original file again"
        )
    if raw[3] != expect_ndim:
        raise DataError(
            f"{path}: expected a {expect_ndim}-d IDX file, found {raw[3]} dimensions; are images and labels swapped?"
        )
    header = 4 + 4 * expect_ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header; fetch the file again")
    dims = [int(d) for d in np.frombuffer(raw, dtype=">u4", count=expect_ndim, offset=4)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataError(
            f"{path}: header says {dims} ({size} bytes) but {len(raw) - header} bytes follow; "
            "the file is truncated or corrupt, fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_split(root: Path, prefix: str, num_classes: int, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of one split (``train`` or ``t10k``) under ``root``."""
    arrays = []
    for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
        name = f"{prefix}-{kind}-ubyte"
        path = next((p for p in (root / f"{name}.gz", root / name) if p.exists()), None)
        if path is None:
            raise DataError(f"{root / (name + '.gz')}: file not found (nor {name}); {hint}")
        arrays.append(read_idx(path, ndim))
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{root}/{prefix}-*: {len(images)} images but {len(labels)} labels; the files do not match")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(
            f"{root}/{prefix}-labels-idx1-ubyte: label {int(labels.max())} outside 0..{num_classes - 1}; "
            "wrong or corrupt label file"
        )
    return images[:, None].copy(), labels.astype(np.int64)
