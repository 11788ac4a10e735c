"""locallearn.data.cifar: CIFAR-10/100 binary and python layouts, written here byte by byte from the format
(docs/data.md, "File formats"; the archive page), read back through the registry; and the restricted unpickler."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from locallearn.data import DataError, dataset_spec, list_datasets, load_split
from locallearn.data.cifar import URL

from .conftest import one_line_data_error as error

torch.set_num_threads(1)

N_TRAIN, N_TEST = 7, 4  # images per train batch file / in the test file


# ---------------------------------------------------------------------------------------------------------------------
# writers, independent of the reader: planes written one after the other, Python 2 pickles built from opcodes


def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def pixel_bytes(image: np.ndarray) -> bytes:
    """3072 bytes: the R plane, then G, then B, each 32 rows of 32 pixels."""
    return b"".join(bytes(int(image[c, r, col]) for r in range(32) for col in range(32)) for c in range(3))


def flat_rows(images: np.ndarray) -> np.ndarray:
    return np.frombuffer(b"".join(pixel_bytes(im) for im in images), dtype=np.uint8).reshape(len(images), 3072)


def write_binary(path: Path, images: np.ndarray, *label_lists: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(bytes(ls) + pixel_bytes(im) for im, *ls in zip(images, *label_lists)))


def _py2(obj) -> bytes:
    """Protocol-2 opcodes as Python 2 wrote them (str → SHORT_BINSTRING/BINSTRING, numpy.core globals)."""
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if obj is None:
        return b"N"
    if isinstance(obj, int):
        return b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    if isinstance(obj, bytes):
        return (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<I", len(obj))) + obj
    if isinstance(obj, tuple):
        return b"(" + b"".join(map(_py2, obj)) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(map(_py2, obj)) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    assert isinstance(obj, np.ndarray) and obj.dtype == np.uint8
    dtype = b"cnumpy\ndtype\n" + _py2((b"u1", False, True)) + b"R" + _py2((3, b"|", None, None, None, -1, -1, 0))
    array = b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + _py2((0,)) + _py2(b"b") + b"tR"
    state = b"(" + _py2(1) + _py2(obj.shape) + dtype + b"b" + _py2(False) + _py2(obj.tobytes()) + b"t"
    return array + state + b"b"


def write_python(path: Path, batch: dict, py2: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x02" + _py2(batch) + b"." if py2 else pickle.dumps(batch, protocol=4))


def make_cifar10(root: Path, fmt: str, seed: int = 0, py2: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five train batches of N_TRAIN images and a test batch of N_TEST, in ``root/cifar-10-batches-{fmt}``."""
    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-bin" if fmt == "bin" else "cifar-10-batches-py")
    out: dict[str, list] = {"train": [[], []], "test": [[], []]}
    names = [(f"data_batch_{i}", "train", N_TRAIN) for i in range(1, 6)] + [("test_batch", "test", N_TEST)]
    for i, (name, split, n) in enumerate(names):
        images, labels = random_images(n, seed * 100 + i), rng.integers(0, 10, n).tolist()
        if fmt == "bin":
            write_binary(folder / f"{name}.bin", images, labels)
        else:
            write_python(folder / name, {b"batch_label": b"x", b"labels": labels, b"data": flat_rows(images)}, py2)
        out[split][0].append(images)
        out[split][1].append(labels)
    return {s: (np.concatenate(x), np.concatenate(y)) for s, (x, y) in out.items()}


def make_cifar100(root: Path, fmt: str, py2: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for i, (split, n) in enumerate((("train", 9), ("test", 5))):
        images = random_images(n, 50 + i)
        fine = [99, 0, 57] + [(13 * j + 5) % 100 for j in range(n - 3)]
        coarse = [(f // 5 + 1) % 20 for f in fine]  # differs from fine: catches reading the wrong byte/key
        if fmt == "bin":
            write_binary(root / "cifar-100-binary" / f"{split}.bin", images, coarse, fine)
        else:
            batch = {
                b"filenames": [b"a"] * n,
                b"fine_labels": fine,
                b"coarse_labels": coarse,
                b"data": flat_rows(images),
            }
            write_python(root / "cifar-100-python" / split, batch, py2)
        out[split] = (images, np.array(fine))
    return out


def check_split(name: str, root: Path, split: str, expected: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = load_split(name, str(root), split)
    assert images.dtype == np.uint8 and images.shape == expected[0].shape and images.flags.writeable
    assert labels.dtype == np.int64 and labels.shape == (len(images),)
    np.testing.assert_array_equal(images, expected[0])
    np.testing.assert_array_equal(labels, expected[1])


# ---------------------------------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("fmt", ["bin", "py"])
@pytest.mark.parametrize("inside", [False, True], ids=["parent", "batches-folder"])
def test_cifar10_round_trip(tmp_path, fmt, inside):
    data = make_cifar10(tmp_path, fmt)
    root = tmp_path / f"cifar-10-batches-{fmt}" if inside else tmp_path
    for split in ("train", "test"):
        check_split("cifar10", root, split, data[split])
    assert load_split("cifar10", str(root), "train")[0].shape == (5 * N_TRAIN, 3, 32, 32)


def test_pixel_layout_is_plane_major(tmp_path):
    # One image whose byte i is i % 251: pixel (c, r, col) must come from offset 1024 c + 32 r + col.
    flat = (np.arange(3072) % 251).astype(np.uint8)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(bytes([3]) + flat.tobytes())
    images, labels = load_split("cifar10", str(tmp_path), "test")
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [3]
    for c, r, col in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 5, 7)]:
        assert images[0, c, r, col] == (1024 * c + 32 * r + col) % 251


def test_python3_pickle(tmp_path):
    # A protocol-4 re-pickle from numpy 2 names numpy._core.multiarray._reconstruct: admitted too.
    data = make_cifar10(tmp_path, "py", py2=False)
    check_split("cifar10", tmp_path, "train", data["train"])


def test_binary_preferred(tmp_path):
    binary = make_cifar10(tmp_path, "bin", seed=1)
    make_cifar10(tmp_path, "py", seed=2)
    check_split("cifar10", tmp_path, "train", binary["train"])
    check_split("cifar10", tmp_path, "test", binary["test"])


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar100_fine_labels(tmp_path, fmt):
    data = make_cifar100(tmp_path, fmt)
    for split in ("train", "test"):
        check_split("cifar100", tmp_path, split, data[split])
    check_split(
        "cifar100", tmp_path / ("cifar-100-binary" if fmt == "bin" else "cifar-100-python"), "test", data["test"]
    )


def test_specs():
    assert {"cifar10", "cifar100"} <= set(list_datasets())
    c10, c100 = dataset_spec("cifar10"), dataset_spec("cifar100")
    assert (c10.num_classes, c100.num_classes) == (10, 100)
    for spec in (c10, c100):
        assert (spec.channels, spec.size, spec.pad, spec.pad_mode, spec.flip) == (3, 32, 4, "reflect", True)
        assert len(spec.mean) == len(spec.std) == 3
    np.testing.assert_allclose(c10.mean, np.array([125.3, 123.0, 113.9]) / 255)
    np.testing.assert_allclose(c10.std, np.array([63.0, 62.1, 66.7]) / 255)
    assert c10.default_roots == ("data/cifar10",) and c100.default_roots == ("data/cifar100",)


# ---------------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("cut", [1, 3072, 3075])
def test_truncated_binary(tmp_path, cut):
    make_cifar10(tmp_path, "bin")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "train")
    error(exc, str(path), "truncated")


def test_empty_binary(tmp_path):
    make_cifar10(tmp_path, "bin")
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(b"")
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "test")
    error(exc, str(path))


def test_bad_label_binary(tmp_path):
    make_cifar10(tmp_path, "bin")
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_5.bin"
    write_binary(path, random_images(2, 0), [1, 10])
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "train")
    error(exc, str(path), "label 10", "0..9")


@pytest.mark.parametrize("bad", [100, -1])
def test_bad_label_python(tmp_path, bad):
    path = tmp_path / "cifar-100-python" / "test"
    write_python(path, {b"fine_labels": [0, bad], b"data": flat_rows(random_images(2, 0))})
    with pytest.raises(DataError) as exc:
        load_split("cifar100", str(tmp_path), "test")
    error(exc, str(path), f"label {bad}", "0..99")


@pytest.mark.parametrize(
    ("batch", "fragment"),
    [
        ({b"labels": [1]}, "b'data'"),
        ({b"data": np.zeros((1, 3072), np.uint8)}, "b'labels'"),
        ({b"labels": [1], b"data": np.zeros((1, 3000), np.uint8)}, "3072"),
        ({b"labels": [1, 2], b"data": np.zeros((1, 3072), np.uint8)}, "one per image"),
        ({b"labels": [b"cat"], b"data": np.zeros((1, 3072), np.uint8)}, "integers"),
        ([1, 2], "dict"),
    ],
)
def test_malformed_python_batch(tmp_path, batch, fragment):
    path = tmp_path / "test_batch"
    write_python(path, batch)
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "test")
    error(exc, str(path), fragment)


@pytest.mark.parametrize(
    "content", [b"", b"garbage, not a pickle", b"\x80\x02}(U\x04data"], ids=["empty", "junk", "cut"]
)
def test_unreadable_pickle(tmp_path, content):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "test")
    error(exc, str(path))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["opcodes", "reduce", "nested"])
def test_malicious_pickle_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    if how == "opcodes":  # the classic protocol-0 payload
        path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    elif how == "reduce":
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    else:  # a well-formed batch whose label list hides the payload
        path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]}, protocol=4))
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "test")
    error(exc, str(path), "refusing", "system")
    assert not marker.exists()


def test_missing_everything(tmp_path):
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "train")
    error(exc, str(tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin"), "cifar-10-batches-py", URL, "data.root")
    with pytest.raises(DataError) as exc:
        load_split("cifar100", str(tmp_path / "nowhere"), "test")
    error(exc, str(tmp_path / "nowhere" / "cifar-100-binary" / "test.bin"), URL)


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_missing_one_batch(tmp_path, fmt):
    make_cifar10(tmp_path, fmt)
    path = tmp_path / f"cifar-10-batches-{fmt}" / ("data_batch_4" + (".bin" if fmt == "bin" else ""))
    path.unlink()
    with pytest.raises(DataError) as exc:
        load_split("cifar10", str(tmp_path), "train")
    error(exc, str(path), "not found")
