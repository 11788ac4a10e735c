"""Class-folder datasets (``imagenet``, ``imagefolder``): tiny JPEG/PNG folders written here. Shapes, labels and the
class count from the folders; InfoPro's ImageNet transforms (docs/data.md, "Datasets and their recipes");
reproducible augmentation for a seed (any worker count, resumable); one-line errors naming the bad folder or file;
and a short training run through ``fit``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from locallearn.data import DataError
from locallearn.data.imagefolder import (
    RATIO,
    SCALE,
    FolderLoader,
    center_box,
    decode,
    random_resized_box,
    scan_split,
)
from locallearn.train.build import build_loaders
from locallearn.train.config import ConfigError, load_config
from locallearn.train.entry import fit

from .conftest import one_line_data_error

Image = pytest.importorskip("PIL.Image")
CLASSES = ("ant", "bee", "cat")


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> None:
    h, w = size
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def make_folders(root: Path, train: int = 5, val: int = 2, seed: int = 0) -> Path:
    """root/{train,val}/<class>/ with JPEG, PNG, grayscale and RGBA images of assorted sizes."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                ext, mode = [(".JPEG", "RGB"), (".png", "RGB"), (".jpg", "L"), (".png", "RGBA")][i % 4]
                write_image(folder / f"{c}_{i}{ext}", rng, (30 + 7 * i, 48 - 3 * i), mode)
    (root / "train" / "ant" / "notes.txt").write_text("not an image, skipped")
    return root


@pytest.fixture()
def folders(tmp_path: Path) -> Path:
    return make_folders(tmp_path / "data")


def config(root: Path, *extra: str):
    return load_config(
        None,
        [
            "data.name=imagenet",
            f"data.root={root}",
            "data.image_size=24",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "data.num_workers=0",
            *extra,
        ],
    )


def all_batches(loader, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return list(loader.batches(epoch, start))


def test_shapes_labels_and_class_count_come_from_the_folders(folders: Path) -> None:
    train, test, spec = build_loaders(config(folders), torch.device("cpu"))
    assert spec.num_classes == 3 and spec.size == 24  # the name says ImageNet, the folders say 3 classes
    assert (train.n, test.n, len(train), len(test)) == (15, 6, 4, 2)
    assert train.index.classes == CLASSES and all(p.endswith((".JPEG", ".png", ".jpg")) for p in train.index.paths)
    labels = []
    for x, y, raw in train.batches(0):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 24, 24)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert raw.dtype == torch.uint8 and raw.shape == x.shape and y.dtype == torch.int64
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
        torch.testing.assert_close(x, (raw.float() - mean) / std)
        labels += y.tolist()
    assert sorted(labels) == sorted(train.index.labels.tolist())  # every image once per epoch
    (_, y0, _), (_, y1, _) = all_batches(test)
    assert y0.tolist() + y1.tolist() == [0, 0, 1, 1, 2, 2]  # evaluation keeps the folder order


def test_augmentation_is_a_function_of_seed_epoch_and_position(folders: Path) -> None:
    base = all_batches(build_loaders(config(folders), torch.device("cpu"))[0])
    again = all_batches(build_loaders(config(folders, "data.num_workers=2"), torch.device("cpu"))[0])
    for (x, y, raw), (x2, y2, raw2) in zip(base, again, strict=True):  # same batches whatever the worker count
        assert torch.equal(raw, raw2) and torch.equal(y, y2) and torch.equal(x, x2)
    other_seed = all_batches(build_loaders(config(folders, "run.seed=1"), torch.device("cpu"))[0])
    assert not torch.equal(torch.cat([b[2] for b in base]), torch.cat([b[2] for b in other_seed]))
    loader = build_loaders(config(folders), torch.device("cpu"))[0]
    assert not torch.equal(all_batches(loader, 1)[0][2], base[0][2])  # a new epoch, new order and crops
    resumed = all_batches(loader, 0, start=2)
    assert len(resumed) == 2 and torch.equal(resumed[0][2], base[2][2])  # resuming mid-epoch: the same batches


def test_evaluation_is_resize_then_center_crop(tmp_path: Path) -> None:
    """The fused crop+resize matches "resize the short side to 32, crop the central 28" done in two steps."""
    yy, xx = np.mgrid[0:60, 0:90]
    smooth = np.stack([xx * 2, yy * 4, (xx + yy)], axis=-1).clip(0, 255).astype(np.uint8)
    path = tmp_path / "smooth.png"
    Image.fromarray(smooth).save(path)
    fused = decode(str(path), 28, lambda w, h: center_box(w, h, 28, 32)).astype(np.float32)
    resized = np.asarray(Image.fromarray(smooth).resize((48, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    two_step = resized[2:30, 10:38]
    assert fused.shape == (28, 28, 3) and np.abs(fused - two_step).mean() < 2.0


def test_random_resized_crop_boxes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(8, 400)), int(rng.integers(8, 400))
        left, top, right, bottom = random_resized_box(w, h, rng)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    areas, aspects = [], []
    for _ in range(300):
        left, top, right, bottom = random_resized_box(500, 400, rng)
        areas.append((right - left) * (bottom - top) / (500 * 400))
        aspects.append((right - left) / (bottom - top))
    assert SCALE[0] * 0.9 <= min(areas) and max(areas) <= SCALE[1] and np.median(areas) < 0.7
    assert RATIO[0] * 0.9 <= min(aspects) and max(aspects) <= RATIO[1] * 1.1
    # A 1000×10 strip cannot hold a 3/4..4/3 crop of >= 8% area: the fallback is the centre at the widest ratio.
    assert random_resized_box(1000, 10, rng) == (493, 0, 506, 10)


def test_decode_gives_rgb_for_every_mode(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for mode, ext in (("L", ".jpg"), ("RGBA", ".png"), ("RGB", ".bmp")):
        path = tmp_path / f"img{ext}"
        write_image(path, rng, (50, 70), mode)
        out = decode(str(path), 16, lambda w, h: (0.0, 0.0, float(w), float(h)))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_a_one_line_error_naming_it(folders: Path, damage: str, workers: int) -> None:
    bad = folders / "train" / "bee" / "bee_0.JPEG"
    data = bad.read_bytes()
    bad.write_bytes(b"\x00not a jpeg" * 10 if damage == "garbage" else data[: len(data) // 2])
    train, _, _ = build_loaders(config(folders, f"data.num_workers={workers}"), torch.device("cpu"))
    with pytest.raises(DataError) as exc:
        all_batches(train)
    one_line_data_error(exc, str(bad), "cannot decode")


def test_folder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        scan_split(tmp_path / "nope" / "train")
    one_line_data_error(exc, "nope/train", "folder not found", "<class>")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        scan_split(tmp_path / "empty" / "train")
    one_line_data_error(exc, "no class folders")
    root = make_folders(tmp_path / "a")
    for f in (root / "train" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataError) as exc:
        scan_split(root / "train")
    one_line_data_error(exc, "train/cat", "holds no images")
    root = make_folders(tmp_path / "b")
    (root / "val" / "dog").mkdir()
    with pytest.raises(DataError) as exc:
        build_loaders(config(root), torch.device("cpu"))
    one_line_data_error(exc, "val/dog", "not among the 3 training classes")
    root = make_folders(tmp_path / "c")
    (root / "val").rename(root / "test")  # val/ may be called test/
    assert build_loaders(config(root), torch.device("cpu"))[1].n == 6
    with pytest.raises(DataError) as exc:
        build_loaders(config(tmp_path / "missing"), torch.device("cpu"))
    one_line_data_error(exc, "missing/train", "folder not found")


def test_limits_keep_every_class_and_options_are_checked(folders: Path) -> None:
    train, test, _ = build_loaders(config(folders, "data.limit_train=6", "data.limit_test=3"), torch.device("cpu"))
    assert train.n == 6 and set(train.index.labels.tolist()) == {0, 1, 2} and test.n == 3
    with pytest.raises(DataError, match="pad"):
        build_loaders(config(folders, "data.pad=4"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="class-folder datasets only"):
        build_loaders(load_config(None, ["data.image_size=24"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="3 mean"):
        FolderLoader(train.index, 4, train=True, size=8, mean=(0.5,), std=(0.5,))


def test_training_runs_on_a_class_folder(folders: Path, tmp_path: Path) -> None:
    cfg = config(
        folders,
        "data.name=imagefolder",
        "model.name=resnet18",
        "model.width=4",
        "model.channels_last=false",
        "method.name=dgl",
        "split.k=2",
        "run.epochs=1",
        "run.progress=false",
        f"run.out={tmp_path / 'runs'}",
    )
    result = fit(cfg, quiet=True)
    assert len(result["train_loss"]) == 2 and all(math.isfinite(v) for v in result["train_loss"])
    assert 0.0 <= result["test_acc"] <= 1.0
