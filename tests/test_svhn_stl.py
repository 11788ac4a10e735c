"""locallearn.data.svhn / stl10: tiny files in the exact on-disk formats (docs/data.md, "File formats"), read back
through the registry, and corrupt/truncated variants that must give a one-line DataError naming the file."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

from locallearn.data import DataError, dataset_spec, list_datasets, load_split

from .conftest import one_line_data_error as error

try:
    import scipy.io as sio
except ImportError:  # pragma: no cover - scipy is in the dev extra
    sio = None

needs_scipy = pytest.mark.skipif(sio is None, reason="SVHN .mat files need scipy (pip install locallearn[svhn])")


# ---------------------------------------------------------------------------------------------------------------------
# SVHN: X (H, W, C, N) uint8, y (N, 1) with 10 meaning digit 0


def write_svhn(path: Path, n: int, seed: int, labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write a .mat like the official one; returns the expected (N, C, H, W) images and 0..9 labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array(labels if labels is not None else rng.integers(1, 11, n), dtype=np.uint8).reshape(n, 1)
    sio.savemat(str(path), {"X": x, "y": y})
    expected = np.stack([np.stack([x[:, :, c, i] for c in range(3)]) for i in range(n)])  # element by element
    return expected, np.array([v % 10 for v in y[:, 0]], dtype=np.int64)


@needs_scipy
def test_svhn_round_trip(tmp_path):
    train = write_svhn(tmp_path / "train_32x32.mat", 5, 0, [10, 1, 5, 10, 9])
    test = write_svhn(tmp_path / "test_32x32.mat", 3, 1)
    for split, expected in (("train", train), ("test", test)):
        images, labels = load_split("svhn", str(tmp_path), split)
        assert images.dtype == np.uint8 and images.shape == expected[0].shape and images.flags.c_contiguous
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, expected[0])
        np.testing.assert_array_equal(labels, expected[1])
    assert load_split("svhn", str(tmp_path), "train")[1].tolist() == [0, 1, 5, 0, 9]  # 10 → digit 0


@needs_scipy
def test_svhn_pixel_layout(tmp_path):
    x = np.zeros((32, 32, 3, 2), np.uint8)
    x[3, 7, 2, 1] = 200  # row 3, column 7, blue, image 1
    x[0, 31, 0, 0] = 17
    sio.savemat(str(tmp_path / "test_32x32.mat"), {"X": x, "y": np.array([[10], [3]], np.uint8)})
    images, labels = load_split("svhn", str(tmp_path), "test")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 3]
    assert images[1, 2, 3, 7] == 200 and images[0, 0, 0, 31] == 17 and int(images.sum()) == 217


@needs_scipy
def test_svhn_float_labels_and_extra(tmp_path):
    train = write_svhn(tmp_path / "train_32x32.mat", 4, 2)
    x = np.full((32, 32, 3, 2), 9, np.uint8)
    sio.savemat(str(tmp_path / "extra_32x32.mat"), {"X": x, "y": np.array([[10.0], [2.0]])})  # doubles, as MATLAB
    images, labels = load_split("svhn_extra", str(tmp_path), "train")
    assert images.shape == (6, 3, 32, 32) and (images[4:] == 9).all()
    np.testing.assert_array_equal(images[:4], train[0])
    assert labels.tolist() == train[1].tolist() + [0, 2]
    assert load_split("svhn", str(tmp_path), "train")[0].shape == (4, 3, 32, 32)  # svhn leaves extra out


@needs_scipy
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]], np.uint8)}, "label 11"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [1]], np.uint8)}, "label 0"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1]], np.uint8)}, "one per image"),
        ({"X": np.zeros((28, 28, 3, 1), np.uint8), "y": np.array([[1]], np.uint8)}, "(32, 32, 3, N)"),
        ({"X": np.zeros((32, 32, 3, 1), np.float32), "y": np.array([[1]], np.uint8)}, "uint8"),
        ({"images": np.zeros((32, 32, 3, 1), np.uint8)}, "expected variables X and y"),
    ],
    ids=["label-11", "label-0", "count", "shape", "dtype", "keys"],
)
def test_svhn_malformed(tmp_path, content, fragment):
    path = tmp_path / "test_32x32.mat"
    sio.savemat(str(path), content)
    with pytest.raises(DataError) as exc:
        load_split("svhn", str(tmp_path), "test")
    error(exc, str(path), fragment)


@needs_scipy
@pytest.mark.parametrize("cut", ["empty", "junk", "half"])
def test_svhn_corrupt_file(tmp_path, cut):
    path = tmp_path / "train_32x32.mat"
    write_svhn(path, 4, 3)
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "junk": b"not a matlab file at all" * 10, "half": raw[: len(raw) // 2]}[cut])
    with pytest.raises(DataError) as exc:
        load_split("svhn", str(tmp_path), "train")
    error(exc, str(path))


def test_svhn_missing_file(tmp_path):
    with pytest.raises(DataError) as exc:
        load_split("svhn", str(tmp_path), "test")
    error(exc, str(tmp_path / "test_32x32.mat"), "not found")


def test_svhn_without_scipy(tmp_path, monkeypatch):
    (tmp_path / "test_32x32.mat").write_bytes(b"whatever")
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(DataError) as exc:
        load_split("svhn", str(tmp_path), "test")
    error(exc, str(tmp_path / "test_32x32.mat"), "pip install locallearn[svhn]")


# ---------------------------------------------------------------------------------------------------------------------
# STL-10: column-major 96×96 planes, labels 1..10


def stl_bytes(images: np.ndarray) -> bytes:
    """Each image as the file stores it: channel by channel, each plane column by column."""
    return b"".join(
        bytes(int(im[c, r, col]) for col in range(96) for r in range(96)) for im in images for c in range(3)
    )


def write_stl(folder: Path, split: str, n: int, seed: int, labels: list[int] | None = None) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
    labels = labels if labels is not None else rng.integers(1, 11, n).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(stl_bytes(images))
    (folder / f"{split}_y.bin").write_bytes(bytes(labels))
    return images, [v - 1 for v in labels]


@pytest.mark.parametrize("inside", [False, True], ids=["parent", "stl10_binary"])
def test_stl10_round_trip(tmp_path, inside):
    data = {"train": write_stl(tmp_path / "stl10_binary", "train", 3, 0, [1, 10, 4])}
    data["test"] = write_stl(tmp_path / "stl10_binary", "test", 2, 1)
    root = tmp_path / "stl10_binary" if inside else tmp_path
    for split, (images, labels) in data.items():
        x, y = load_split("stl10", str(root), split)
        assert x.dtype == np.uint8 and x.shape == images.shape and x.flags.c_contiguous
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, images)
        assert y.tolist() == labels
    assert load_split("stl10", str(root), "train")[1].tolist() == [0, 9, 3]


def test_stl10_column_major(tmp_path):
    # One image whose file byte i is i % 251: pixel (c, row, col) comes from offset 9216 c + 96 col + row.
    flat = (np.arange(3 * 96 * 96) % 251).astype(np.uint8)
    (tmp_path / "test_X.bin").write_bytes(flat.tobytes())
    (tmp_path / "test_y.bin").write_bytes(bytes([7]))
    images, labels = load_split("stl10", str(tmp_path), "test")
    assert images.shape == (1, 3, 96, 96) and labels.tolist() == [6]
    for c, r, col in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 95, 94), (1, 5, 7)]:
        assert images[0, c, r, col] == (9216 * c + 96 * col + r) % 251


@pytest.mark.parametrize("cut", [1, 27648, 27650])
def test_stl10_truncated_images(tmp_path, cut):
    write_stl(tmp_path, "train", 2, 0)
    path = tmp_path / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(DataError) as exc:
        load_split("stl10", str(tmp_path), "train")
    error(exc, str(path), "truncated")


def test_stl10_empty_images(tmp_path):
    write_stl(tmp_path, "test", 1, 0)
    (tmp_path / "test_X.bin").write_bytes(b"")
    with pytest.raises(DataError) as exc:
        load_split("stl10", str(tmp_path), "test")
    error(exc, str(tmp_path / "test_X.bin"))


@pytest.mark.parametrize(("labels", "fragment"), [([1, 11], "label 11"), ([0, 1], "label 0"), ([1], "do not match")])
def test_stl10_bad_labels(tmp_path, labels, fragment):
    write_stl(tmp_path, "test", 2, 0)
    path = tmp_path / "test_y.bin"
    path.write_bytes(bytes(labels))
    with pytest.raises(DataError) as exc:
        load_split("stl10", str(tmp_path), "test")
    error(exc, str(path), fragment)


def test_stl10_missing(tmp_path):
    with pytest.raises(DataError) as exc:
        load_split("stl10", str(tmp_path), "train")
    error(exc, str(tmp_path / "stl10_binary" / "train_X.bin"), "stl10_binary.tar.gz")
    write_stl(tmp_path, "train", 1, 0)
    (tmp_path / "train_y.bin").unlink()
    with pytest.raises(DataError) as exc:
        load_split("stl10", str(tmp_path), "train")
    error(exc, str(tmp_path / "train_y.bin"), "not found")


# ---------------------------------------------------------------------------------------------------------------------
# registry


def test_specs():
    assert {"svhn", "svhn_extra", "stl10"} <= set(list_datasets())
    for name in ("svhn", "svhn_extra"):
        spec = dataset_spec(name)
        assert (spec.num_classes, spec.channels, spec.size, spec.pad, spec.pad_mode, spec.flip) == (
            10,
            3,
            32,
            2,
            "zero",
            False,
        )
        assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    stl = dataset_spec("stl10")
    assert (stl.num_classes, stl.channels, stl.size, stl.pad, stl.flip) == (10, 3, 96, 4, True)
    assert stl.mean == stl.std == (0.5, 0.5, 0.5)
