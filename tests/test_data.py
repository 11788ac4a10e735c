"""locallearn.data: IDX reading (raw and gzip), the dataset registry, and the device-resident loader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from locallearn.data.datasets import dataset_spec, load_split
from locallearn.data.idx import DataError, read_idx, read_idx_split
from locallearn.data.loader import ResidentLoader

torch.set_num_threads(1)

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
HAVE_FMNIST = all((FMNIST_ROOT / f).is_file() for f in FMNIST_FILES)

SETTINGS = settings(
    max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# ---------------------------------------------------------------------------------------------------------------------
# IDX helpers: written independently from the IDX format (magic 00 00 08 ndim, big-endian uint32 dims, uint8 data)


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_split(
    root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz_images: bool = True, gz_labels: bool = True
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / f"{prefix}-images-idx3-ubyte{'.gz' if gz_images else ''}", images, gz_images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{'.gz' if gz_labels else ''}", labels, gz_labels)


def assert_one_line_error(exc: pytest.ExceptionInfo, path: Path | str) -> str:
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert str(path) in msg, msg
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------------------------
# read_idx


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


@SETTINGS
@given(arr=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)), gz=st.booleans())
def test_read_idx_round_trip(tmp_path, arr, gz):
    path = write_idx(tmp_path / "x.idx", arr, gz)
    out = read_idx(path, arr.ndim)
    assert out.dtype == np.uint8
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_big_endian_dims(tmp_path, gz):
    # Dims > 255 only decode right if the header is read as big-endian uint32.
    arr = (np.arange(2 * 300 * 1) % 251).astype(np.uint8).reshape(2, 300, 1)
    out = read_idx(write_idx(tmp_path / "big", arr, gz), 3)
    assert out.shape == (2, 300, 1)
    np.testing.assert_array_equal(out, arr)


def _good(n: int = 3) -> bytes:
    return idx_bytes(np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2))


def _gzip_bad_crc() -> bytes:
    data = bytearray(gzip.compress(_good()))
    data[-8] ^= 0xFF  # CRC32 trailer
    return bytes(data)


BAD_FILES = {
    "empty": (b"", 3, "magic"),
    "bad_magic_type": (b"\x00\x00\x09\x03" + _good()[4:], 3, "magic"),
    "bad_magic_zero": (b"\x01\x00\x08\x03" + _good()[4:], 3, "magic"),
    "wrong_ndim": (_good(), 1, "dimensions"),
    "truncated_header": (b"\x00\x00\x08\x03" + struct.pack(">I", 3), 3, "header"),
    "truncated_data": (_good()[:-1], 3, "truncated"),
    "trailing_data": (_good() + b"\x00", 3, "bytes follow"),
    "gz_truncated_data": (gzip.compress(_good()[:-5]), 3, "truncated"),
    "gz_bad_crc": (_gzip_bad_crc(), 3, "corrupt"),
    "gz_truncated_stream": (gzip.compress(_good(50))[:-12], 3, "corrupt"),
    "gz_garbage": (b"\x1f\x8b" + b"not a gzip stream at all", 3, "corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_idx_bad_files(tmp_path, case):
    content, ndim, fragment = BAD_FILES[case]
    path = tmp_path / f"{case}-idx"
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        read_idx(path, ndim)
    msg = assert_one_line_error(exc, path)
    assert fragment in msg, msg


def test_read_idx_missing_file(tmp_path):
    path = tmp_path / "nope" / "train-images-idx3-ubyte"
    with pytest.raises(DataError) as exc:
        read_idx(path, 3)
    assert "not found" in assert_one_line_error(exc, path)


# ---------------------------------------------------------------------------------------------------------------------
# read_idx_split and load_split


@SETTINGS
@given(
    n=st.integers(0, 6),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    gz_images=st.booleans(),
    gz_labels=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_split_round_trip(tmp_path, n, h, w, gz_images, gz_labels, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    labels = rng.integers(0, 7, n, dtype=np.uint8)
    root = tmp_path / f"r{seed}-{n}-{h}-{w}-{gz_images}-{gz_labels}"
    write_split(root, "train", images, labels, gz_images, gz_labels)
    x, y = read_idx_split(root, "train", 7, "HINT")
    assert x.dtype == np.uint8 and x.shape == (n, 1, h, w)
    assert y.dtype == np.int64 and y.shape == (n,)
    np.testing.assert_array_equal(x[:, 0], images)
    np.testing.assert_array_equal(y, labels.astype(np.int64))


def test_read_idx_split_count_mismatch(tmp_path):
    write_split(tmp_path, "train", np.zeros((4, 2, 2), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(DataError) as exc:
        read_idx_split(tmp_path, "train", 10, "HINT")
    msg = assert_one_line_error(exc, tmp_path)
    assert "4" in msg and "3" in msg


def test_read_idx_split_label_range(tmp_path):
    images = np.zeros((3, 2, 2), np.uint8)
    write_split(tmp_path, "train", images, np.array([0, 9, 2], np.uint8))
    _, y = read_idx_split(tmp_path, "train", 10, "HINT")  # the largest valid label is fine
    assert y.tolist() == [0, 9, 2]
    write_split(tmp_path, "train", images, np.array([0, 10, 2], np.uint8))
    with pytest.raises(DataError) as exc:
        read_idx_split(tmp_path, "train", 10, "HINT")
    assert "10" in assert_one_line_error(exc, tmp_path)


@pytest.mark.parametrize("missing", ["images", "labels"])
def test_read_idx_split_missing_file_has_hint(tmp_path, missing):
    write_split(tmp_path, "t10k", np.zeros((2, 2, 2), np.uint8), np.zeros(2, np.uint8))
    (tmp_path / f"t10k-{missing}-idx{3 if missing == 'images' else 1}-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        read_idx_split(tmp_path, "t10k", 10, "install the frobnicator")
    msg = assert_one_line_error(exc, tmp_path)
    assert "install the frobnicator" in msg
    assert missing in msg


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_load_split_reads_train_and_t10k(tmp_path, name, gz):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 256, (3, 28, 28), np.uint8)
    train_y, test_y = np.array([0, 1, 9, 3, 4], np.uint8), np.array([7, 8, 2], np.uint8)
    write_split(tmp_path, "train", train_x, train_y, gz, gz)
    write_split(tmp_path, "t10k", test_x, test_y, gz, gz)
    for split, (ex, ey) in {"train": (train_x, train_y), "test": (test_x, test_y)}.items():
        x, y = load_split(name, str(tmp_path), split)
        assert x.dtype == np.uint8 and x.shape == (len(ex), 1, 28, 28)
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 0], ex)
        np.testing.assert_array_equal(y, ey)


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist"):
        load_split("fashion-mnist", str(tmp_path), "train")  # close-match suggestion
    with pytest.raises(DataError) as exc:
        load_split("fashion_mnist", str(tmp_path), "train")  # empty root: hint says how to get the data
    assert dataset_spec("fashion_mnist").hint in assert_one_line_error(exc, tmp_path)
    write_split(tmp_path, "train", np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8))
    with pytest.raises(DataError):  # 10 classes, so label 10 is out of range
        load_split("mnist", str(tmp_path), "train")


@pytest.mark.skipif(not HAVE_FMNIST, reason=f"Fashion-MNIST not installed at {FMNIST_ROOT}")
def test_real_fashion_mnist():
    spec = dataset_spec("fashion_mnist")
    assert spec.num_classes == 10
    x, y = load_split("fashion_mnist", str(FMNIST_ROOT), "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == 9
    np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, 6000))
    # The registry's normalisation constants are the training set's statistics.
    pixels = x.astype(np.float64) / 255
    assert abs(pixels.mean() - spec.mean[0]) < 1e-3
    assert abs(pixels.std() - spec.std[0]) < 1e-3
    xt, yt = load_split("fashion_mnist", None, "test")  # default root finds the Debian package's files
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(yt, minlength=10), np.full(10, 1000))
    assert not np.array_equal(xt[:100], x[:100])


# ---------------------------------------------------------------------------------------------------------------------
# ResidentLoader


def make_data(n: int, c: int, h: int, w: int, seed: int, low: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images; label i for sample i, so each batch says which source images it holds."""
    images = np.random.default_rng(seed).integers(low, 256, (n, c, h, w), dtype=np.uint8)
    return images, np.arange(n, dtype=np.int64)


def collect(loader: ResidentLoader, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in b) for b in loader.batches(epoch=epoch, start=start)]


def expected_len(n: int, bs: int, train: bool) -> int:
    full, rest = divmod(n, bs)
    return full + (rest > (1 if train else 0))


def windows(img: np.ndarray, p: int, mode: str) -> dict[tuple[int, int], np.ndarray]:
    """Every (dy, dx) window of the padded image, padded with numpy (independently of the loader)."""
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), mode="constant" if mode == "zero" else "reflect")
    return {(dy, dx): padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)}


def matching_offsets(raw: np.ndarray, img: np.ndarray, p: int, mode: str = "zero") -> list[tuple[int, int]]:
    return [off for off, win in windows(img, p, mode).items() if np.array_equal(win, raw)]


loader_shapes = st.tuples(st.integers(1, 20), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6))


@SETTINGS
@given(
    shape=loader_shapes,
    bs=st.integers(1, 8),
    train=st.booleans(),
    pad=st.integers(0, 2),
    flip=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_loader_shapes_dtypes_and_normalisation(shape, bs, train, pad, flip, channels_last, seed, data):
    n, c, h, w = shape
    images, labels = make_data(n, c, h, w, seed)
    mean = tuple(data.draw(st.floats(0.0, 1.0)) for _ in range(c))
    std = tuple(data.draw(st.floats(0.05, 1.0)) for _ in range(c))
    loader = ResidentLoader(
        images, labels, bs, train=train, mean=mean, std=std, pad=pad, flip=flip, seed=seed, channels_last=channels_last
    )
    assert loader.n == n
    assert len(loader) == expected_len(n, bs, train)
    batches = list(loader.batches())
    assert len(batches) == len(loader)
    sizes = [len(b[1]) for b in batches]
    for x, y, raw in batches:
        b = len(y)
        assert x.shape == (b, c, h, w) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (b,) and y.dtype == torch.int64
        assert raw.shape == (b, c, h, w) and raw.dtype == torch.uint8
        if channels_last:
            assert x.is_contiguous(memory_format=torch.channels_last)
        else:
            assert x.is_contiguous()
        m = torch.tensor(mean, dtype=torch.float64).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, c, 1, 1)
        ref = (raw.double() / 255 - m) / s
        torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-4)
    assert all(s == bs for s in sizes[:-1])
    seen = torch.cat([b[1] for b in batches]).tolist() if batches else []
    assert len(seen) == len(set(seen)) == sum(sizes)  # no sample twice in an epoch
    if not train or n % bs != 1:
        assert sorted(seen) == list(range(n))  # nothing dropped
    else:
        assert len(seen) == n - 1  # only the trailing batch of one is dropped


@pytest.mark.parametrize(
    ("n", "bs", "train", "expected"),
    [
        (10, 5, True, 2),
        (11, 5, True, 2),
        (12, 5, True, 3),
        (11, 5, False, 3),
        (1, 1, True, 1),
        (1, 4, True, 0),
        (1, 4, False, 1),
        (0, 3, False, 0),
    ],
)
def test_loader_len(n, bs, train, expected):
    images, labels = make_data(n, 1, 2, 2, 0)
    loader = ResidentLoader(images, labels, bs, train=train, mean=(0.5,), std=(0.5,))
    assert len(loader) == expected
    assert sum(1 for _ in loader.batches()) == expected


@SETTINGS
@given(
    n=st.integers(16, 40),
    bs=st.integers(1, 7),
    pad=st.integers(0, 2),
    flip=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    epoch=st.integers(0, 50),
)
def test_loader_deterministic_and_resumable(n, bs, pad, flip, seed, epoch):
    images, labels = make_data(n, 1, 5, 4, seed % 97)
    kw = dict(train=True, mean=(0.3,), std=(0.4,), pad=pad, flip=flip, seed=seed)
    a = ResidentLoader(images, labels, bs, **kw)
    b = ResidentLoader(images, labels, bs, **kw)  # a fresh loader: randomness is a function of (seed, epoch, i)
    full = collect(a, epoch)
    again = collect(b, epoch)
    assert len(full) == len(again) == len(a)
    for u, v in zip(full, again):
        for s, t in zip(u, v):
            assert torch.equal(s, t)
    order = torch.cat([t[1] for t in full])
    other = torch.cat([t[1] for t in collect(a, epoch + 1)])
    assert not torch.equal(order, other)  # a new permutation each epoch (16! orders)
    for start in (0, 1, len(full) // 2, len(full) - 1, len(full)):
        resumed = collect(b, epoch, start=start)
        assert len(resumed) == len(full) - start
        for u, v in zip(full[start:], resumed):
            for s, t in zip(u, v):
                assert torch.equal(s, t)


def test_loader_seed_changes_stream():
    images, labels = make_data(32, 1, 4, 4, 0)
    orders = []
    for seed in (0, 1):
        loader = ResidentLoader(images, labels, 8, train=True, mean=(0.5,), std=(0.5,), seed=seed)
        orders.append(torch.cat([b[1] for b in loader.batches(0)]))
    assert not torch.equal(orders[0], orders[1])


@SETTINGS
@given(
    shape=loader_shapes, bs=st.integers(2, 8), pad=st.integers(1, 3), seed=st.integers(0, 1000), epoch=st.integers(0, 5)
)
def test_loader_zero_pad_crops_are_windows(shape, bs, pad, seed, epoch):
    n, c, h, w = shape
    images, labels = make_data(n, c, h, w, seed)
    loader = ResidentLoader(
        images, labels, bs, train=True, mean=(0.5,) * c, std=(0.5,) * c, pad=pad, pad_mode="zero", seed=seed
    )
    for _, y, raw in loader.batches(epoch):
        for i, r in zip(y.tolist(), raw.numpy()):
            assert matching_offsets(r, images[i], pad, "zero"), f"crop of sample {i} is no window of it"


@SETTINGS
@given(shape=loader_shapes, bs=st.integers(2, 8), pad=st.integers(1, 3), flip=st.booleans(), seed=st.integers(0, 1000))
def test_loader_reflect_pad_crops_are_windows(shape, bs, pad, flip, seed):
    n, c, h, w = shape
    h, w = h + pad, w + pad  # reflect padding needs images larger than the pad
    images, labels = make_data(n, c, h, w, seed)
    loader = ResidentLoader(
        images,
        labels,
        bs,
        train=True,
        mean=(0.5,) * c,
        std=(0.5,) * c,
        pad=pad,
        pad_mode="reflect",
        flip=flip,
        seed=seed,
    )
    for _, y, raw in loader.batches(0):
        for i, r in zip(y.tolist(), raw.numpy()):
            ok = matching_offsets(r, images[i], pad, "reflect")
            if flip:
                ok = ok or matching_offsets(r[..., ::-1], images[i], pad, "reflect")
            assert ok


def test_loader_all_offsets_occur():
    pad = 2
    # Pixels >= 1, so the zero border pins down each crop's offset uniquely.
    images, labels = make_data(64, 1, 6, 6, 3, low=1)
    loader = ResidentLoader(images, labels, 16, train=True, mean=(0.5,), std=(0.5,), pad=pad, seed=7)
    seen = set()
    for epoch in range(3):
        for _, y, raw in loader.batches(epoch):
            for i, r in zip(y.tolist(), raw.numpy()):
                offs = matching_offsets(r, images[i], pad)
                assert len(offs) == 1
                seen.add(offs[0])
    assert {dy for dy, _ in seen} == set(range(2 * pad + 1))
    assert {dx for _, dx in seen} == set(range(2 * pad + 1))
    assert len(seen) == (2 * pad + 1) ** 2  # 192 crops cover all 25 (dy, dx) pairs
    # Rows and columns get independent offsets: not every crop sits on the diagonal.
    assert any(dy != dx for dy, dx in seen)


def test_loader_flip_only():
    images, labels = make_data(64, 2, 5, 7, 11)
    loader = ResidentLoader(images, labels, 10, train=True, mean=(0.5, 0.5), std=(0.5, 0.5), flip=True, seed=3)
    kinds = []
    for _, y, raw in loader.batches(0):
        for i, r in zip(y.tolist(), raw.numpy()):
            same, flipped = np.array_equal(r, images[i]), np.array_equal(r, images[i][..., ::-1])
            assert same != flipped  # random 5x7 images are not mirror-symmetric
            kinds.append(flipped)
    assert 10 < sum(kinds) < len(kinds) - 10  # both occur, about half each


def test_loader_no_augmentation_without_pad_or_flip():
    images, labels = make_data(20, 1, 4, 4, 5)
    loader = ResidentLoader(images, labels, 6, train=True, mean=(0.5,), std=(0.5,))
    for _, y, raw in loader.batches(1):
        np.testing.assert_array_equal(raw.numpy(), images[y.numpy()])


@SETTINGS
@given(
    shape=loader_shapes,
    bs=st.integers(1, 8),
    pad=st.integers(0, 2),
    flip=st.booleans(),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 3),
)
def test_eval_loader_in_order_unaugmented(shape, bs, pad, flip, seed, epoch):
    n, c, h, w = shape
    images, labels = make_data(n, c, h, w, seed)
    loader = ResidentLoader(
        images, labels, bs, train=False, mean=(0.25,) * c, std=(0.5,) * c, pad=pad, flip=flip, seed=seed
    )
    assert len(loader) == -(-n // bs)
    batches = list(loader.batches(epoch))
    ys = torch.cat([b[1] for b in batches])
    raws = torch.cat([b[2] for b in batches])
    assert ys.tolist() == list(range(n))  # every sample once, in order (including a trailing batch of one)
    np.testing.assert_array_equal(raws.numpy(), images)
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(x, (torch.from_numpy(images).float() / 255 - 0.25) / 0.5, rtol=1e-5, atol=1e-5)


def test_loader_accepts_tensors_and_keeps_labels():
    images, _ = make_data(9, 1, 3, 3, 0)
    labels = np.array([4, 1, 7, 0, 2, 2, 9, 3, 5])
    loader = ResidentLoader(
        torch.from_numpy(images), torch.from_numpy(labels), 4, train=True, mean=(0.5,), std=(0.5,), seed=1
    )
    for _, y, raw in loader.batches(0):
        for label, r in zip(y.tolist(), raw.numpy()):
            idx = [j for j in range(9) if np.array_equal(images[j], r)]
            assert len(idx) == 1 and labels[idx[0]] == label


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(batch_size=0), "batch size"),
        (dict(batch_size=-3), "batch size"),
        (dict(pad_mode="mirror"), "pad_mode"),
        (dict(images=np.zeros((4, 1, 3, 3), np.float32)), "uint8"),
        (dict(images=np.zeros((4, 1, 3, 3), np.int64)), "uint8"),
        (dict(images=np.zeros((4, 3, 3), np.uint8)), "uint8"),
        (dict(mean=(0.5, 0.5), std=(0.5, 0.5)), "channel"),
        (dict(mean=(0.5,), std=(0.5, 0.5)), "channel"),
        (dict(pad=3, pad_mode="reflect"), "reflect"),
    ],
)
def test_loader_bad_inputs(kwargs, fragment):
    args = dict(
        images=np.zeros((4, 1, 3, 3), np.uint8),
        labels=np.zeros(4, np.int64),
        batch_size=2,
        train=True,
        mean=(0.5,),
        std=(0.5,),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=fragment):
        ResidentLoader(args.pop("images"), args.pop("labels"), args.pop("batch_size"), **args)
