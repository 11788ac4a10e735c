"""CIFAR-10 and CIFAR-100 readers, from either official archive, registered as ``cifar10`` and ``cifar100``.

Get the data from https://www.cs.toronto.edu/~kriz/cifar.html (the "binary version" or the "python version"),
extract it, and point ``data.root`` at the folder holding ``cifar-10-batches-bin``/``cifar-10-batches-py`` (or
``cifar-100-binary``/``cifar-100-python``), or at that folder itself. No downloads happen here (docs/data.md).

Both layouts store each image as 3072 bytes, plane-major: 1024 R, 1024 G, 1024 B, each 32×32 row-major, so
a plain reshape gives (N, 3, 32, 32). Sizes come from the files: old torchvision and DGL
hard-code 50000/10000, we count records instead. The binary layout is preferred when both exist,
because it needs no unpickling at all.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import DatasetSpec, register_dataset
from .idx import DataError

try:  # numpy >= 2 keeps the pickle helpers in numpy._core; numpy.core is a deprecated alias there
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

PIXELS = 3 * 32 * 32
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# The only globals an official python-version batch references (a Python 2 pickle of a dict holding a numpy
# array): pickle.load would otherwise import and call anything a tampered file names (e.g. os.system).
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that admits only numpy array reconstruction; any other global raises :class:`DataError`."""

    def __init__(self, file, path: Path) -> None:
        # encoding="bytes": the batches are Python 2 pickles, their str keys and pixel strings stay bytes.
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise DataError(
                f"{self.path}: refusing to unpickle global {module}.{name} (a CIFAR batch holds only numpy arrays); "
                f"not an official CIFAR file, fetch it again from {URL}"
            )
        return _SAFE_GLOBALS[(module, name)]


@dataclass(frozen=True)
class _Layout:
    """One on-disk layout: its folder name, file names per split, and where the label sits."""

    folder: str
    files: dict[str, tuple[str, ...]]
    binary: bool
    label_bytes: int = 1  # binary: bytes before the pixels; the label used is the last of them (CIFAR-100: fine)
    label_key: bytes = b"labels"  # python: dict key of the labels


def _read_binary(path: Path, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    record = layout.label_bytes + PIXELS
    raw = path.read_bytes()
    if not raw or len(raw) % record:
        raise DataError(
            f"{path}: {len(raw)} bytes is not a whole number of {record}-byte records "
            f"({layout.label_bytes} label + {PIXELS} pixel bytes); the file is truncated or corrupt, fetch it again"
        )
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    return rows[:, layout.label_bytes :], rows[:, layout.label_bytes - 1]


def _read_python(path: Path, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a corrupt pickle can fail in many ways (EOFError, UnpicklingError, TypeError, ...)
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e}); fetch it again") from None
    if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and {layout.label_key!r}, found {keys}")
    data, labels = batch[b"data"], np.asarray(batch[layout.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be a uint8 N×{PIXELS} array, found {what}; fetch the file again")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise DataError(
            f"{path}: {layout.label_key!r} must be {len(data)} integers (one per image), "
            f"found {labels.dtype} {labels.shape}; fetch the file again"
        )
    return data, labels


def _read_layout(folder: Path, layout: _Layout, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate a split's files in order (data_batch_1..5), checking every label is in range."""
    images, labels = [], []
    for name in layout.files[split]:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: file not found; the {folder.name} folder is incomplete, extract it again")
        x, y = (_read_binary if layout.binary else _read_python)(path, layout)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DataError(f"{path}: label {bad} outside 0..{num_classes - 1}; wrong or corrupt file, fetch it again")
        images.append(x.reshape(-1, 3, 32, 32))
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)  # concatenate copies: writable, owns its memory


def _reader(layouts: tuple[_Layout, ...], num_classes: int):
    """``read(root, split)`` trying each layout (binary first) in ``root/<folder>`` and then in ``root`` itself."""

    def read(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
        for layout in layouts:
            for folder in (root / layout.folder, root):
                if any((folder / name).is_file() for name in layout.files[split]):
                    return _read_layout(folder, layout, split, num_classes)
        first, second = (root / lay.folder / lay.files[split][0] for lay in layouts)
        raise DataError(
            f"{first}: file not found (nor {second}); download the binary or python version from {URL} "
            "and extract it under data.root"
        )

    return read


_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_CIFAR10 = (
    _Layout("cifar-10-batches-bin", {s: tuple(f + ".bin" for f in fs) for s, fs in _BATCHES.items()}, binary=True),
    _Layout("cifar-10-batches-py", _BATCHES, binary=False),
)
_CIFAR100 = (
    # Records are <coarse label><fine label><pixels>: the fine label (100 classes) is the one papers report.
    _Layout("cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)}, binary=True, label_bytes=2),
    _Layout("cifar-100-python", {"train": ("train",), "test": ("test",)}, binary=False, label_key=b"fine_labels"),
)

# InfoPro's train.py (docs/data.md): reflect-pad 4, random crop 32, flip, Normalize with these x/255 stats.
_CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
_CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
# The papers' scripts have no CIFAR-100 recipe: the same one, with the commonly used CIFAR-100 statistics in the
# same x/255 form (the WRN/DenseNet-lineage values), not the CIFAR-10 ones.
_CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
_CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))

for _name, _classes, _layouts, _mean, _std in (
    ("cifar10", 10, _CIFAR10, _CIFAR10_MEAN, _CIFAR10_STD),
    ("cifar100", 100, _CIFAR100, _CIFAR100_MEAN, _CIFAR100_STD),
):
    register_dataset(
        DatasetSpec(
            name=_name,
            num_classes=_classes,
            channels=3,
            size=32,
            mean=_mean,
            std=_std,
            pad=4,
            pad_mode="reflect",
            flip=True,
            default_roots=(f"data/{_name}",),
            read=_reader(_layouts, _classes),
            hint=f"download the binary or python version from {URL}, extract it under data.root "
            f"(e.g. data/{_name}/{_layouts[0].folder}) and set data.root",
        )
    )
