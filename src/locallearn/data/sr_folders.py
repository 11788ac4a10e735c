"""Super-resolution image folders (``data.name=sr_folder``, :mod:`.sr`): layouts, a header-only index, decoding,
and the bicubic LR images of HR-only folders.

Layouts (the scale picks the LR folder):

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

Indexing reads only the file headers (~0.05 ms an image), so sizes are checked against the scale before training
starts and a folder of any size costs no memory: :class:`SRFile` decodes its pixels when a batch needs them.
Images are read with Pillow as RGB (greyscale repeated to three channels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .idx import DataError

# The scales super-resolution benchmarks ship LR images for (DIV2K's X2/X3/X4 folders, Set5/Set14/B100/Urban100).
SCALES = (2, 3, 4)

IMAGE_EXTS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm")
MARGIN = 3  # LR pixels around a patch whose HR window makes its LR pixels (the bicubic kernel reaches 2)


@dataclass
class SRPair:
    """One decoded image: ``hr`` uint8 (C, H, W) with H, W multiples of the scale, ``lr`` uint8 (C, H/s, W/s)."""

    name: str
    hr: torch.Tensor
    lr: torch.Tensor

    @property
    def lr_size(self) -> tuple[int, int]:
        return self.lr.shape[-2], self.lr.shape[-1]

    def load(self) -> SRPair:
        return self

    def patch(self, top: int, left: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The LR patch of side ``size`` at (top, left) and its aligned HR patch."""
        s = self.hr.shape[-1] // self.lr.shape[-1]
        lr = self.lr[:, top : top + size, left : left + size]
        return lr, self.hr[:, s * top : s * (top + size), s * left : s * (left + size)]


@dataclass(frozen=True)
class SRFile:
    """One image on disk, decoded when needed: HR path, LR path (None: LR made by bicubic), the scale, and the LR
    size (H, W) from the headers (of the HR image cropped to a multiple of the scale)."""

    hr: Path
    lr: Path | None
    scale: int
    lr_size: tuple[int, int]

    @property
    def name(self) -> str:
        return str(self.hr)

    def load(self) -> SRPair:
        lr = None if self.lr is None else read_image(self.lr)
        return make_pair(self.hr.name, read_image(self.hr), self.scale, lr, str(self.lr))

    def patch(self, top: int, left: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`SRPair.patch`. A generated LR patch comes from an HR window ``MARGIN`` LR pixels wider than the
        patch (clipped at the image border), not from the whole image: the same pixels (tested), far less work."""
        s, hr = self.scale, torch.from_numpy(read_image(self.hr))
        hr_patch = hr[:, s * top : s * (top + size), s * left : s * (left + size)]
        if self.lr is not None:
            return torch.from_numpy(read_image(self.lr))[:, top : top + size, left : left + size], hr_patch
        (h, w), m = self.lr_size, MARGIN
        t0, l0, t1, l1 = max(top - m, 0), max(left - m, 0), min(top + size + m, h), min(left + size + m, w)
        lr = bicubic_lr(hr[:, s * t0 : s * t1, s * l0 : s * l1].contiguous(), s)
        return lr[:, top - t0 : top - t0 + size, left - l0 : left - l0 + size], hr_patch


SRImage = SRPair | SRFile


def _pillow(path: Path) -> Any:
    """PIL.Image, or a one-line error when Pillow is missing."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path}: reading image folders needs Pillow; pip install pillow") from None
    return Image


def _unreadable(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot read as an image ({e}); the file is corrupt or not an image")


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels (~0.05 ms)."""
    pil = _pillow(path)
    try:
        with pil.open(path) as img:
            return img.height, img.width
    except (OSError, ValueError, SyntaxError) as e:
        raise _unreadable(path, e) from None


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 (3, H, W) RGB."""
    pil = _pillow(path)
    try:
        with pil.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise _unreadable(path, e) from None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def bicubic_lr(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """uint8 (C, H, W), H and W multiples of ``scale`` → uint8 (C, H/s, W/s), antialiased bicubic (not MATLAB's)."""
    size = (hr.shape[-2] // scale, hr.shape[-1] // scale)
    lr = F.interpolate(hr[None].float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return lr[0].round().clamp(0, 255).to(torch.uint8)


def lr_size_of(
    name: str, hr_size: Sequence[int], scale: int, lr_size: Sequence[int] | None = None, lr_name: str = ""
) -> tuple[int, int]:
    """The LR size (H, W) of an HR image of ``hr_size`` at ``scale`` (after cropping HR to a multiple of it, MATLAB
    ``modcrop``); checks an LR image's ``lr_size`` against it, naming the scale it would fit."""
    (hh, hw), s = hr_size, scale
    h, w = hh // s, hw // s
    if h < 1 or w < 1:
        raise DataError(f"{name}: {hw}×{hh} is smaller than the scale {s}; remove the image or lower data.scale")
    if lr_size is not None and tuple(lr_size) != (h, w):
        lh, lw = lr_size
        fits = [t for t in SCALES if t != s and (hh // t, hw // t) == (lh, lw)]
        hint = (
            f"the LR image fits ×{fits[0]}: set data.scale={fits[0]}, or put ×{s} LR images there"
            if fits
            else "is the LR folder for another scale (data.scale)? Replace the LR image, or delete the LR folder to "
            "generate LR images"
        )
        raise DataError(
            f"{lr_name}: LR image is {lw}×{lh} but HR {name} is {hw}×{hh}, which at scale ×{s} needs {w}×{h}; {hint}"
        )
    return h, w


def make_pair(
    name: str, hr: np.ndarray | torch.Tensor, scale: int, lr: np.ndarray | torch.Tensor | None = None, lr_name: str = ""
) -> SRPair:
    """Crop HR to a multiple of ``scale`` (top-left, MATLAB ``modcrop``); check or generate the LR image."""
    hr = torch.as_tensor(hr)
    lr = None if lr is None else torch.as_tensor(lr)
    h, w = lr_size_of(name, hr.shape[-2:], scale, None if lr is None else lr.shape[-2:], lr_name)
    hr = hr[:, : h * scale, : w * scale].contiguous()
    return SRPair(name, hr, bicubic_lr(hr, scale) if lr is None else lr.contiguous())


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
    other = sorted(p.name for p in folder.glob("image_SRF_*") if p.is_dir())
    if other:
        raise DataError(
            f"{folder}: no image_SRF_{scale} folder for scale ×{scale} (found {', '.join(other)}); set data.scale to "
            "match, or use a folder made for this scale"
        )
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


def index_folder(
    folder: Path, split: str, scale: int, limit: int | None = None, explicit: bool = False
) -> list[SRFile]:
    """The images of ``split`` in ``folder`` (the first ``limit``), sizes checked from the headers, not decoded."""
    files = []
    for hr, lr in find_files(folder, split, scale, explicit)[: limit or None]:
        lr_size = lr_size_of(hr.name, image_size(hr), scale, None if lr is None else image_size(lr), str(lr))
        files.append(SRFile(hr, lr, scale, lr_size))
    return files


def read_folder(folder: Path, split: str, scale: int, limit: int | None = None, explicit: bool = False):
    """The pairs of ``split`` in ``folder`` (the first ``limit`` images), decoded now."""
    return [image.load() for image in index_folder(folder, split, scale, limit, explicit)]
