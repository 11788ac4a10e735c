"""SR data at DIV2K scale (``data/sr.py``, ``data/sr_folders.py``): folders are indexed, not decoded; patches are
cut in DataLoader workers yet equal to the resident path's for any worker count, and resume exactly mid-epoch (also
through ``fit``); every wrong-scale input is a one-line DataError naming the fix."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch

from locallearn.data import DataError, dataset_spec
from locallearn.data.sr import (
    SREvalLoader,
    SRFile,
    SRTrainLoader,
    bicubic_lr,
    index_folder,
    make_pair,
    read_folder,
    sr_loaders,
)
from locallearn.train import fit, load_checkpoint, load_config

from .conftest import one_line_data_error
from .test_sr import random_image, write_png

pytest.importorskip("PIL")

HR_SIZES = [(30, 36), (41, 28), (33, 45)]  # (H, W); odd sizes: HR is cropped to a multiple of the scale


def write_div2k(root: Path, scale: int = 2) -> Path:
    """DIV2K layout, paired: ``DIV2K_{train,valid}_HR`` with ``DIV2K_*_LR_bicubic/X{scale}`` made by bicubic."""
    for split, sizes in (("train", HR_SIZES), ("valid", HR_SIZES[:1])):
        for i, (h, w) in enumerate(sizes):
            hr = random_image(h, w, i)
            write_png(root / f"DIV2K_{split}_HR/{i:04d}.png", hr)
            lr = make_pair("", hr.transpose(2, 0, 1), scale).lr.permute(1, 2, 0).numpy()
            write_png(root / f"DIV2K_{split}_LR_bicubic/X{scale}/{i:04d}x{scale}.png", lr)
    return root


def write_plain(root: Path) -> Path:
    """A plain folder of HR images (LR made on the fly)."""
    for i, (h, w) in enumerate(HR_SIZES):
        write_png(root / f"{i}.png", random_image(h, w, 20 + i))
    return root


def all_batches(loader, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader.batches(epoch, start)]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


# ---- lazy loading ------------------------------------------------------------------------------------------------


def test_folders_are_indexed_not_decoded_and_match_the_resident_path(tmp_path: Path) -> None:
    """The loader holds paths and header sizes only, before and after an epoch, yet its patches equal those of
    the same images decoded up front (the previous, resident behaviour), for paired and HR-only folders."""
    div2k, plain = write_div2k(tmp_path / "div2k", 3), write_plain(tmp_path / "plain")
    for folder in (div2k, plain):
        files = dataset_spec("sr_folder").read(str(folder), "train", scale=3)
        assert [type(f) for f in files] == [SRFile] * 3
        assert [f.lr_size for f in files] == [(h // 3, w // 3) for h, w in HR_SIZES]
        kw = dict(scale=3, patch_size=24, repeat=3, seed=4)
        lazy, resident = SRTrainLoader(files, 4, **kw), SRTrainLoader(read_folder(folder, "train", 3), 4, **kw)
        assert_same(all_batches(lazy, 1), all_batches(resident, 1))
        for image in lazy.images:  # nothing decoded was kept
            assert isinstance(image, SRFile)
            assert not any(isinstance(getattr(image, f.name), torch.Tensor) for f in dataclasses.fields(image))
        assert len(pickle.dumps(lazy.images)) < sum(3 * h * w for h, w in HR_SIZES) / 4  # HR pixels alone: 11 kB
        evaluation = SREvalLoader(files, scale=3)
        for (x, y, _), pair in zip(evaluation.batches(), read_folder(folder, "train", 3)):
            assert torch.equal(y[0], pair.hr.float() / 255) and torch.equal(x[0], pair.lr.float() / 255)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_generated_lr_patches_equal_the_whole_image_lr(tmp_path: Path, scale: int) -> None:
    """An HR-only image's LR patch comes from an HR window around it: it equals the whole image's bicubic LR cut
    at the same place, borders included."""
    write_png(tmp_path / "a.png", random_image(70, 97, scale))
    (image,) = index_folder(tmp_path, "train", scale)
    whole = make_pair("a", torch.from_numpy(random_image(70, 97, scale)).permute(2, 0, 1), scale)
    h, w = image.lr_size
    size = 4
    corners = [(0, 0), (h - size, w - size), (0, w - size), (h - size, 0), (1, 2), (h // 2, w // 3), (2, w - size - 1)]
    for top, left in corners:
        lr, hr = image.patch(top, left, size)
        assert torch.equal(lr, whole.lr[:, top : top + size, left : left + size]), (top, left)
        assert torch.equal(hr, whole.hr[:, scale * top : scale * (top + size), scale * left : scale * (left + size)])
    assert torch.equal(whole.lr, bicubic_lr(whole.hr, scale))


def test_batches_do_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    files = index_folder(write_div2k(tmp_path), "train", 2)
    kw = dict(scale=2, patch_size=16, repeat=4, seed=7)
    single, workers = SRTrainLoader(files, 3, **kw), SRTrainLoader(files, 3, num_workers=2, **kw)
    assert workers._loader.num_workers == 2  # decoded in worker processes
    for epoch in (0, 1):
        assert_same(all_batches(single, epoch), all_batches(workers, epoch))
    assert not torch.equal(next(single.batches(0))[1], next(single.batches(1))[1])  # epochs differ
    test = index_folder(tmp_path, "test", 2)
    assert_same(all_batches(SREvalLoader(test, scale=2)), all_batches(SREvalLoader(test, scale=2, num_workers=2)))


def test_resume_mid_epoch_sees_the_same_batches(tmp_path: Path) -> None:
    files = index_folder(write_plain(tmp_path), "train", 2)
    kw = dict(scale=2, patch_size=16, repeat=3, seed=1, num_workers=2)
    full = all_batches(SRTrainLoader(files, 2, **kw), epoch=2)
    assert len(full) == 5  # 9 patches, the last batch holds one
    assert_same(all_batches(SRTrainLoader(files, 2, **kw), epoch=2, start=3), full[3:])


def sr_run(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "data.name=sr_folder",
        f"data.root={root}",
        "data.patch_size=16",
        "data.batch_size=2",
        "data.repeat=2",
        "model.name=edsr4",
        "model.width=4",
        "method.name=glcan",
        "split.k=2",
        "optim.name=adamw",
        "optim.lr=0.001",
        "run.epochs=1",
        "run.device=cpu",
        "run.progress=false",
        f"run.out={out}",
        *extra,
    ]


def test_fit_on_a_folder_resumes_mid_epoch_bitwise(tmp_path: Path) -> None:
    """``fit`` on a DIV2K-layout folder (3 images × repeat 2 = 3 steps): 3 steps straight == 1, resume, 2."""
    root = write_div2k(tmp_path / "div2k")
    full = fit(load_config(None, sr_run(root, tmp_path / "a")), quiet=True)
    part = fit(load_config(None, sr_run(root, tmp_path / "b", "run.max_steps=1")), quiet=True)
    resumed = fit(resume=part["run_dir"], overrides=["run.max_steps=null"], quiet=True)
    a = load_checkpoint(Path(full["run_dir"]) / "ckpt_last.pt")
    b = load_checkpoint(Path(resumed["run_dir"]) / "ckpt_last.pt")
    assert a["step"] == b["step"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert full["test_psnr"] == resumed["test_psnr"]


# ---- wrong scale and other bad inputs: one line each, naming the fix ------------------------------------------


def test_lr_image_of_another_scale_names_file_sizes_and_scale(tmp_path: Path) -> None:
    root = write_div2k(tmp_path)
    write_png(root / "DIV2K_train_LR_bicubic/X2/0001x2.png", random_image(10, 7, 0))  # HR 41×28 at ×4
    with pytest.raises(DataError) as e:
        dataset_spec("sr_folder").read(str(root), "train", scale=2)
    one_line_data_error(e, "0001x2.png", "is 7×10", "HR 0001.png is 28×41", "scale ×2 needs 14×20", "data.scale=4")


def test_layout_for_another_scale(tmp_path: Path) -> None:
    root = write_div2k(tmp_path / "div2k", scale=3)
    with pytest.raises(DataError) as e:
        index_folder(root, "train", 2)
    one_line_data_error(e, "DIV2K_train_LR_bicubic", "no X2 folder for scale ×2", "found X3", "data.scale")
    write_png(tmp_path / "srf/image_SRF_3/img_001_SRF_3_HR.png", random_image(12, 12, 0))
    write_png(tmp_path / "srf/image_SRF_3/img_001_SRF_3_LR.png", random_image(4, 4, 0))
    with pytest.raises(DataError) as e:
        index_folder(tmp_path / "srf", "test", 2, explicit=True)
    one_line_data_error(e, "no image_SRF_2 folder", "found image_SRF_3", "data.scale")
    assert index_folder(tmp_path / "srf", "test", 3, explicit=True)[0].lr_size == (4, 4)


def test_scale_outside_2_3_4_fails_before_reading(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        dataset_spec("sr_folder").read(str(tmp_path / "missing"), "train", scale=5)
    one_line_data_error(e, "data.scale=5", "2, 3, 4", "set data.scale")
    cfg = load_config(None, sr_run(write_div2k(tmp_path / "div2k"), tmp_path / "runs", "data.scale=8"))
    with pytest.raises(DataError) as e:
        fit(cfg, quiet=True)
    one_line_data_error(e, "data.scale=8")


def test_patch_size_not_a_multiple_of_the_scale(tmp_path: Path) -> None:
    spec = dataset_spec("sr_folder")
    kw = dict(batch_size=2, repeat=1, augment=True, limit_train=None, limit_test=None, test_root=None, seed=0)
    with pytest.raises(DataError) as e:  # checked before the (missing) folder is read
        sr_loaders(spec, str(tmp_path), scale=3, patch_size=50, device="cpu", channels_last=True, **kw)
    one_line_data_error(e, "data.patch_size=50", "multiple of data.scale=3", "set data.patch_size=48")
    files = index_folder(write_plain(tmp_path / "plain"), "train", 2)
    with pytest.raises(DataError) as e:
        SRTrainLoader(files, 2, scale=2, patch_size=1)
    one_line_data_error(e, "data.patch_size=1", "set data.patch_size=2")


def test_image_smaller_than_the_patch_names_it(tmp_path: Path) -> None:
    files = index_folder(write_div2k(tmp_path), "train", 2)
    with pytest.raises(DataError) as e:
        SRTrainLoader(files, 2, scale=2, patch_size=32)
    one_line_data_error(e, "0000.png", "HR image 36×30 is smaller than data.patch_size=32", "lower data.patch_size")


def test_corrupt_image_in_a_worker_is_one_line(tmp_path: Path) -> None:
    """The header reads fine, the pixels do not: the worker's error reaches the loop as one line."""
    root = write_plain(tmp_path)
    data = (root / "1.png").read_bytes()
    (root / "1.png").write_bytes(data[: len(data) // 2])
    files = index_folder(root, "train", 2)
    with pytest.raises(DataError) as e:
        all_batches(SRTrainLoader(files, 3, scale=2, patch_size=16, num_workers=2))
    one_line_data_error(e, "1.png", "cannot read as an image")
