"""Super-resolution data: image folders and scikit-image's sample photographs, as (HR, LR) pairs.

Datasets (``data.name``):

* ``sr_folder``: ``data.root`` is one of these layouts (the scale picks the LR folder):

  - DIV2K: ``DIV2K_train_HR/0001.png`` with ``DIV2K_train_LR_bicubic/X2/0001x2.png`` (test split:
    ``DIV2K_valid_HR``, ``DIV2K_valid_LR_bicubic``);
  - EDSR's benchmark folders (Set5, Set14, B100, Urban100): ``HR/baby.png`` with ``LR_bicubic/X2/babyx2.png``;
  - the SelfExSR release of the same sets: ``image_SRF_2/img_001_SRF_2_HR.png`` with ``..._LR.png``;
  - a plain folder of images (HR only; e.g. ``Set5/GTmod12``).

  Without an LR folder the LR image is made from the HR one when the data is loaded: the HR image is cropped to a
  multiple of the scale and shrunk with torch's antialiased bicubic (``F.interpolate(mode="bicubic",
  antialias=True)``, Keys a = −0.5 as in PIL), rounded to uint8. That is **not MATLAB's** ``imresize`` (which the
  official DIV2K/benchmark LR images come from; borders and rounding differ slightly), so PSNRs are comparable
  between runs here but not digit-for-digit with published tables; use the official LR folders for those.
  ``data.test_root`` names the evaluation folder; without it the test split is ``DIV2K_valid_HR`` under the root.
* ``skimage_samples``: photographs that ship inside scikit-image (no download): test = astronaut, chelsea,
  coffee (colour); train = rocket, the two motorcycle stereo views (colour) and camera, brick, grass, gravel
  (greyscale, repeated to RGB). Needs ``pip install scikit-image``. ``data.test_root=skimage_samples`` evaluates
  any SR dataset on the three test photographs.

Images are read with Pillow as RGB (greyscale repeated to three channels) and kept resident as uint8.
Training batches are random aligned patches (``data.patch_size`` HR pixels, a multiple of the scale) with
random flips and transposition (the 8 dihedral transforms, EDSR's augmentation) when ``data.flip`` is on; an
epoch draws ``data.repeat`` patches per image. As in :mod:`.loader`, randomness is a pure function of
``(seed, epoch, batch)``. Evaluation batches are whole images, one per batch, HR cropped to a multiple of the scale.
Inputs are LR images in [0, 1] (the model subtracts its own mean), targets HR images in [0, 1].
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import DatasetSpec, register_dataset
from .idx import DataError
from .loader import Triple, _generator

IMAGE_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm")
SKIMAGE_SAMPLES = {
    "train": ("rocket", "motorcycle_left", "motorcycle_right", "camera", "brick", "grass", "gravel"),
    "test": ("astronaut", "chelsea", "coffee"),
}
SKIMAGE = "skimage_samples"


@dataclass
class SRPair:
    """One image: ``hr`` uint8 (C, H, W) with H, W multiples of the scale, ``lr`` uint8 (C, H/s, W/s)."""

    name: str
    hr: torch.Tensor
    lr: torch.Tensor


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (3, H, W) RGB."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path}: reading image folders needs Pillow; pip install pillow") from None
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read as an image ({e}); the file is corrupt or not an image") from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def bicubic_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (C, H, W), H and W multiples of ``scale`` → uint8 (C, H/s, W/s), antialiased bicubic (not MATLAB's)."""
    size = (hr.shape[-2] // scale, hr.shape[-1] // scale)
    lr = F.interpolate(hr[None].float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return lr[0].round().clamp(0, 255).to(torch.uint8)


def make_pair(name: str, hr: np.ndarray | torch.Tensor, scale: int, lr=None, lr_name: str = "") -> SRPair:
    """Crop HR to a multiple of ``scale`` (top-left, MATLAB ``modcrop``); check or generate the LR image."""
    hr = torch.as_tensor(hr)
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    if h < 1 or w < 1:
        raise DataError(f"{name}: {hr.shape[-1]}×{hr.shape[-2]} is smaller than the scale {scale}")
    hr = hr[:, : h * scale, : w * scale].contiguous()
    if lr is None:
        return SRPair(name, hr, bicubic_lr(hr, scale))
    lr = torch.as_tensor(lr)
    if tuple(lr.shape[-2:]) != (h, w):
        raise DataError(
            f"{lr_name}: LR image is {lr.shape[-1]}×{lr.shape[-2]} but HR {name} at scale ×{scale} needs {w}×{h}; "
            "is the LR folder for another scale (data.scale)?"
        )
    return SRPair(name, hr, lr.contiguous())


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _lr_partner(lr_dir: Path, hr: Path, scale: int) -> Path:
    for stem in (f"{hr.stem}x{scale}", hr.stem):
        for ext in (hr.suffix, *IMAGE_EXTS):
            if (lr_dir / (stem + ext)).is_file():
                return lr_dir / (stem + ext)
    raise DataError(f"{lr_dir}: no LR image for {hr.name} (expected {hr.stem}x{scale}{hr.suffix}); folder incomplete")


def find_files(folder: Path, split: str, scale: int, explicit: bool) -> list[tuple[Path, Path | None]]:
    """(HR path, LR path or None) of every image of ``split`` in ``folder`` (layouts in the module docstring).
    ``explicit``: the folder was named for this split (``data.test_root``), so any layout serves it."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; set data.root / data.test_root to an SR image folder")
    word = {"train": "train", "test": "valid"}[split]
    srf = folder / f"image_SRF_{scale}"
    if srf.is_dir():  # SelfExSR release: *_HR.png next to *_LR.png
        hrs = sorted(p for p in _images(srf) if p.stem.endswith("_HR"))
        pairs = []
        for hr in hrs:
            lr = hr.with_name(hr.name.replace("_HR", "_LR"))
            if not lr.is_file():
                raise DataError(f"{srf}: no LR image {lr.name} for {hr.name}; folder incomplete")
            pairs.append((hr, lr))
        return pairs
    div2k = sorted(folder.glob(f"*_{word}_HR"))
    if div2k:
        hr_dir = div2k[0]
    elif split == "test" and not explicit:
        raise DataError(
            f"{folder}: no *_valid_HR folder for the test split; set data.test_root to an evaluation folder "
            "(e.g. Set5) or to skimage_samples"
        )
    elif (folder / "HR").is_dir():
        hr_dir = folder / "HR"
    else:
        hr_dir = folder
    hrs = _images(hr_dir)
    if not hrs:
        raise DataError(
            f"{hr_dir}: no images ({', '.join(IMAGE_EXTS)}); expected image files, HR/ + LR_bicubic/X{scale}/, "
            f"DIV2K_{word}_HR/ or image_SRF_{scale}/"
        )
    lr_root = hr_dir.parent / hr_dir.name.replace("HR", "LR_bicubic") if hr_dir != folder else None
    if lr_root is None or not lr_root.is_dir():
        return [(hr, None) for hr in hrs]
    lr_dir = lr_root / f"X{scale}"
    if not lr_dir.is_dir():
        found = sorted(p.name for p in lr_root.iterdir() if p.is_dir())
        raise DataError(
            f"{lr_root}: no X{scale} folder for scale ×{scale} (found {', '.join(found) or 'none'}); set data.scale "
            "to one of those, or remove the LR folder to generate bicubic LR images"
        )
    return [(hr, _lr_partner(lr_dir, hr, scale)) for hr in hrs]


def read_folder(folder: Path, split: str, scale: int, limit: int | None = None, explicit: bool = False):
    """The pairs of ``split`` in ``folder`` (the first ``limit`` images)."""
    files = find_files(folder, split, scale, explicit)[: limit or None]
    return [
        make_pair(hr.name, read_image(hr), scale, None if lr is None else read_image(lr), str(lr)) for hr, lr in files
    ]


def skimage_image(name: str) -> np.ndarray:
    """One sample photograph shipped with scikit-image, as uint8 (3, H, W)."""
    try:
        data = importlib.import_module("skimage.data")
    except ImportError:
        raise DataError(f"{SKIMAGE}: needs scikit-image (its sample photographs); pip install scikit-image") from None
    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        image = left if name.endswith("left") else right
    else:
        image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].transpose(2, 0, 1))


def read_skimage(split: str, scale: int, limit: int | None = None) -> list[SRPair]:
    names = SKIMAGE_SAMPLES[split][: limit or None]
    return [make_pair(name, skimage_image(name), scale) for name in names]


def _reader(builtin: bool):
    def read(root: Path | None, split: str, *, scale: int, limit: int | None = None, test_root: str | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        if split == "test" and test_root:
            if test_root == SKIMAGE:
                return read_skimage(split, scale, limit)
            return read_folder(Path(test_root).expanduser(), split, scale, limit, explicit=True)
        if builtin:
            return read_skimage(split, scale, limit)
        if root is None:
            raise DataError("sr_folder: set data.root to a folder of training images (DIV2K layout or plain images)")
        return read_folder(Path(root).expanduser(), split, scale, limit)

    return read


class SRTrainLoader:
    """Random aligned (LR, HR) patches: batches of ``(lr01, hr01, lr_uint8)`` on ``device``."""

    def __init__(
        self,
        pairs: list[SRPair],
        batch_size: int,
        *,
        scale: int,
        patch_size: int,
        repeat: int = 1,
        augment: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
    ) -> None:
        if batch_size < 1 or repeat < 1:
            raise ValueError(f"data.batch_size and data.repeat must be >= 1, got {batch_size} and {repeat}")
        if patch_size < scale or patch_size % scale:
            raise ValueError(f"data.patch_size={patch_size} must be a positive multiple of data.scale={scale}")
        if not pairs:
            raise DataError("no training images")
        self.lr_patch = patch_size // scale
        for p in pairs:
            if min(p.lr.shape[-2:]) < self.lr_patch:
                raise DataError(
                    f"{p.name}: HR image {p.hr.shape[-1]}×{p.hr.shape[-2]} is smaller than data.patch_size={patch_size}"
                )
        self.device = torch.device(device)
        self.pairs = [SRPair(p.name, p.hr.to(self.device), p.lr.to(self.device)) for p in pairs]
        self.batch_size, self.scale, self.augment, self.seed = batch_size, scale, augment, seed
        self.channels_last = channels_last
        self.n = len(pairs) * repeat

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Triple]:
        order = torch.randperm(self.n, generator=_generator(self.seed, epoch)) % len(self.pairs)
        p, s = self.lr_patch, self.scale
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
            gen = _generator(self.seed, epoch, i, 1)
            corner = torch.rand(len(idx), 2, generator=gen)
            flips = torch.randint(0, 2, (len(idx), 3), generator=gen).tolist()
            lrs, hrs = [], []
            for j, image in enumerate(idx):
                pair = self.pairs[image]
                top = int(corner[j, 0] * (pair.lr.shape[-2] - p + 1))
                left = int(corner[j, 1] * (pair.lr.shape[-1] - p + 1))
                lr = pair.lr[:, top : top + p, left : left + p]
                hr = pair.hr[:, s * top : s * (top + p), s * left : s * (left + p)]
                if self.augment:
                    lr, hr = dihedral(lr, flips[j]), dihedral(hr, flips[j])
                lrs.append(lr)
                hrs.append(hr)
            yield self._tensors(torch.stack(lrs), torch.stack(hrs))

    def _tensors(self, lr: torch.Tensor, hr: torch.Tensor) -> Triple:
        x = lr.float().div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, hr.float().div_(255), lr

    def __iter__(self) -> Iterator[Triple]:
        return self.batches(0)


def dihedral(image: torch.Tensor, flips: list[int]) -> torch.Tensor:
    """One of the 8 flips/rotations of a (C, H, W) square patch: horizontal, vertical, transpose bits."""
    if flips[0]:
        image = image.flip(-1)
    if flips[1]:
        image = image.flip(-2)
    if flips[2]:
        image = image.transpose(-1, -2)
    return image


class SREvalLoader(SRTrainLoader):
    """Whole images, one per batch (sizes differ), in fixed order."""

    def __init__(self, pairs: list[SRPair], *, scale: int, device: str | torch.device = "cpu", **kw) -> None:
        super().__init__(pairs, 1, scale=scale, patch_size=scale, augment=False, device=device, **kw)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Triple]:
        for pair in self.pairs[start:]:
            yield self._tensors(pair.lr[None], pair.hr[None])


def sr_loaders(
    spec: DatasetSpec,
    root: str | None,
    *,
    scale: int,
    patch_size: int,
    batch_size: int,
    repeat: int,
    augment: bool,
    limit_train: int | None,
    limit_test: int | None,
    test_root: str | None,
    seed: int,
    device: torch.device,
    channels_last: bool,
) -> tuple[SRTrainLoader, SREvalLoader]:
    """Training and evaluation loaders of an SR dataset (the ``data.*`` fields of ``DataCfg``)."""
    kw = {"scale": scale, "test_root": test_root}
    train = spec.read(root, "train", limit=limit_train, **kw)
    test = spec.read(root, "test", limit=limit_test, **kw)
    common = {"scale": scale, "device": device, "channels_last": channels_last}
    return (
        SRTrainLoader(train, batch_size, patch_size=patch_size, repeat=repeat, augment=augment, seed=seed, **common),
        SREvalLoader(test, **common),
    )


_COMMON = {
    "num_classes": 0,
    "channels": 3,
    "size": 48,
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
    "pad": 0,
    "pad_mode": "zero",
    "flip": True,
    "default_roots": (),
    "task": "super_resolution",
}
register_dataset(
    DatasetSpec(
        name="sr_folder",
        read=_reader(builtin=False),
        hint="set data.root to a DIV2K-style or plain folder of HR images (and data.test_root for evaluation)",
        **_COMMON,
    )
)
register_dataset(
    DatasetSpec(
        name=SKIMAGE,
        read=_reader(builtin=True),
        hint="pip install scikit-image (the photographs ship inside it)",
        **_COMMON,
    )
)
