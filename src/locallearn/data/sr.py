"""Super-resolution data: image folders and scikit-image's sample photographs, as (HR, LR) pairs.

Datasets (``data.name``):

* ``sr_folder``: ``data.root`` is a DIV2K, EDSR-benchmark (Set5, Set14, B100, Urban100), SelfExSR or plain
  HR-image folder; LR images come from its ``X{scale}`` folder or are made by bicubic shrinking
  (:mod:`.sr_folders`: layouts, and why these LR images are not MATLAB's). ``data.test_root`` names the
  evaluation folder; without it the test split is ``DIV2K_valid_HR`` under the root.
* ``skimage_samples``: photographs that ship inside scikit-image (no download): test = astronaut, chelsea,
  coffee (colour); train = rocket, the two motorcycle stereo views (colour) and camera, brick, grass, gravel
  (greyscale, repeated to RGB). Needs ``pip install scikit-image``. ``data.test_root=skimage_samples`` evaluates
  any SR dataset on the three test photographs.

A folder is only *indexed* up front: sizes come from the file headers, so a wrong LR size or a too-small image
fails at once. Pixels are decoded when a batch needs them, in ``data.num_workers`` DataLoader processes as for
ImageNet (:mod:`.imagefolder`), so DIV2K (800 2K images, ~7 GB decoded) trains in constant
memory (GLCAN's SR setting, docs/glcan.md). The price is one decode per patch (~60 ms per 2K PNG on one core):
give it workers, or cut the HR images into sub-images first (BasicSR's ``extract_subimages``), which a plain
folder then serves. The built-in photographs (a few MB) stay resident and are cut in this process.

Training batches are random aligned patches (``data.patch_size`` HR pixels, a multiple of the scale) with
random flips and transposition (the 8 dihedral transforms, EDSR's augmentation) when ``data.flip`` is on; an
epoch draws ``data.repeat`` patches per image. As in :mod:`.loader`, randomness is a pure function of
``(seed, epoch, batch)``, drawn in this process: workers only decode and cut, so batches do not depend on the
worker count and a resumed run sees the same batches (docs/data.md). Evaluation batches are whole images,
one per batch, HR cropped to a multiple of the scale. Inputs are LR images in [0, 1] (the model subtracts its own
mean), targets HR images in [0, 1].
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import DatasetSpec, register_dataset
from .idx import DataError
from .imagefolder import EpochBatches
from .loader import Triple, seeded_generator
from .sr_folders import SCALES, SRFile, SRImage, SRPair, bicubic_lr, index_folder, make_pair, read_folder

__all__ = [  # the folder readers are re-exported: data.sr is the one SR data module callers need
    "SREvalLoader",
    "SRFile",
    "SRPair",
    "SRTrainLoader",
    "bicubic_lr",
    "check_patch",
    "check_scale",
    "dihedral",
    "index_folder",
    "make_pair",
    "read_folder",
    "sr_loaders",
]

SKIMAGE_SAMPLES = {
    "train": ("rocket", "motorcycle_left", "motorcycle_right", "camera", "brick", "grass", "gravel"),
    "test": ("astronaut", "chelsea", "coffee"),
}
SKIMAGE = "skimage_samples"


def check_scale(scale: int) -> None:
    """Checked before any folder is read: another scale would only fail later, as a missing ``X{s}`` folder or a
    model that cannot be built."""
    if scale not in SCALES:
        raise DataError(
            f"data.scale={scale}: super-resolution scales are {', '.join(map(str, SCALES))} (EDSR's upsamplers, the "
            "X2/X3/X4 LR folders); set data.scale to one of them"
        )


def check_patch(patch_size: int, scale: int) -> None:
    """An HR patch must cover whole LR pixels, so that the (LR, HR) pair stays aligned."""
    if patch_size < scale or patch_size % scale:
        raise DataError(
            f"data.patch_size={patch_size} is not a multiple of data.scale={scale} (HR patches cover whole LR pixels); "
            f"set data.patch_size={max(patch_size // scale, 1) * scale}"
        )


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
        """Decoded pairs (the built-in photographs) or indexed files (folders) of ``split``."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        check_scale(scale)
        if split == "test" and test_root:
            if test_root == SKIMAGE:
                return read_skimage(split, scale, limit)
            return index_folder(Path(test_root).expanduser(), split, scale, limit, explicit=True)
        if builtin:
            return read_skimage(split, scale, limit)
        if root is None:
            raise DataError("sr_folder: set data.root to a folder of training images (DIV2K layout or plain images)")
        return index_folder(Path(root).expanduser(), split, scale, limit)

    return read


# A sample: (image index, LR top, LR left, dihedral flips or None); top < 0 asks for the whole image.
Key = tuple[int, int, int, tuple[int, ...] | None]
Sample = tuple[torch.Tensor | None, torch.Tensor | None, str | None]


class _SRDataset(Dataset):
    """``dataset[key]`` → (LR uint8, HR uint8, error or None), decoded and cut in a worker process. A decode error
    is returned, not raised, as in :mod:`.imagefolder` (DataLoader would wrap it in a multi-line traceback)."""

    def __init__(self, images: Sequence[SRImage], patch: int) -> None:
        self.images, self.patch = images, patch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key) -> Sample:
        i, top, left, flips = key
        try:
            if top < 0:
                pair = self.images[i].load()
                return pair.lr, pair.hr, None
            lr, hr = self.images[i].patch(top, left, self.patch)
        except DataError as e:
            return None, None, str(e)
        if flips:
            lr, hr = dihedral(lr, flips), dihedral(hr, flips)
        return lr.clone(), hr.clone(), None  # copies: a patch must not keep its whole decoded image alive


def _collate(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    errors = [error for _, _, error in samples if error]
    if errors:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8), errors
    return torch.stack([lr for lr, _, _ in samples]), torch.stack([hr for _, hr, _ in samples]), []


class _SRLoader:
    """What training and evaluation share: batches of ``(lr01, hr01, lr_uint8)`` on ``device`` from a DataLoader
    whose batch sampler is set per pass (``batches(epoch, start)``, as :class:`~.imagefolder.FolderLoader`).
    Workers only for images on disk; resident ones are cut in this process (faster than starting workers)."""

    def __init__(
        self,
        images: Sequence[SRImage],
        batch_size: int,
        patch: int,
        device: str | torch.device,
        channels_last: bool,
        num_workers: int,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.images, self.batch_size = list(images), batch_size
        self.device, self.channels_last = torch.device(device), channels_last
        workers = num_workers if any(isinstance(image, SRFile) for image in self.images) else 0
        self._sampler = EpochBatches()
        self._loader = DataLoader(
            _SRDataset(self.images, patch),
            batch_sampler=self._sampler,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            **(dict(prefetch_factor=4) if workers else {}),
        )

    def _keys(self, epoch: int, start: int) -> list[list[Key]]:
        raise NotImplementedError

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Triple]:
        """Yield the batches of ``epoch`` from batch index ``start`` on (used to resume mid-epoch)."""
        self._sampler.batches = self._keys(epoch, start)
        passing = iter(self._loader)
        try:
            for lr, hr, errors in passing:
                if errors:
                    raise DataError(errors[0])
                yield self._tensors(lr.to(self.device, non_blocking=True), hr.to(self.device, non_blocking=True))
        finally:
            del passing  # its workers shut down now (see FolderLoader.batches)

    def _tensors(self, lr: torch.Tensor, hr: torch.Tensor) -> Triple:
        x = lr.float().div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, hr.float().div_(255), lr

    def __iter__(self) -> Iterator[Triple]:
        return self.batches(0)


class SRTrainLoader(_SRLoader):
    """Random aligned (LR, HR) patches of ``images`` (decoded pairs or files on disk)."""

    def __init__(
        self,
        images: Sequence[SRImage],
        batch_size: int,
        *,
        scale: int,
        patch_size: int,
        repeat: int = 1,
        augment: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1 or repeat < 1:
            raise ValueError(f"data.batch_size and data.repeat must be >= 1, got {batch_size} and {repeat}")
        check_patch(patch_size, scale)
        if not images:
            raise DataError("no training images")
        self.lr_patch = patch_size // scale
        for image in images:
            h, w = image.lr_size
            if min(h, w) < self.lr_patch:
                raise DataError(
                    f"{image.name}: HR image {w * scale}×{h * scale} is smaller than data.patch_size={patch_size}; "
                    "lower data.patch_size or remove the image"
                )
        super().__init__(images, batch_size, self.lr_patch, device, channels_last, num_workers)
        self.scale, self.augment, self.seed = scale, augment, seed
        self.n = len(self.images) * repeat
        self._room = torch.tensor([image.lr_size for image in self.images]) - self.lr_patch + 1  # corner choices

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def _keys(self, epoch: int, start: int) -> list[list[Key]]:
        """Order from (seed, epoch), each batch's corners and flips from (seed, epoch, batch): the draws of the
        former resident loader, so its patches are unchanged, whatever the worker count or the resume point."""
        order = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch)) % len(self.images)
        keys = []
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            gen = seeded_generator(self.seed, epoch, i, 1)
            corners = (torch.rand(len(idx), 2, generator=gen) * self._room[idx]).long().tolist()
            flips = torch.randint(0, 2, (len(idx), 3), generator=gen).tolist()
            keys.append(
                [
                    (j, top, left, tuple(f) if self.augment else None)
                    for j, (top, left), f in zip(idx.tolist(), corners, flips)
                ]
            )
        return keys


def dihedral(image: torch.Tensor, flips: Sequence[int]) -> torch.Tensor:
    """One of the 8 flips/rotations of a (C, H, W) square patch: horizontal, vertical, transpose bits."""
    if flips[0]:
        image = image.flip(-1)
    if flips[1]:
        image = image.flip(-2)
    if flips[2]:
        image = image.transpose(-1, -2)
    return image


class SREvalLoader(_SRLoader):
    """Whole images, one per batch (sizes differ), in fixed order."""

    def __init__(
        self,
        images: Sequence[SRImage],
        *,
        scale: int,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
        num_workers: int = 0,
    ) -> None:
        if not images:
            raise DataError("no evaluation images")
        super().__init__(images, 1, 0, device, channels_last, num_workers)
        self.scale, self.n = scale, len(self.images)

    def __len__(self) -> int:
        return self.n

    def _keys(self, epoch: int, start: int) -> list[list[Key]]:
        return [[(i, -1, -1, None)] for i in range(start, self.n)]


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
    num_workers: int = 0,
) -> tuple[SRTrainLoader, SREvalLoader]:
    """Training and evaluation loaders of an SR dataset (the ``data.*`` fields of ``DataCfg``)."""
    check_scale(scale)
    check_patch(patch_size, scale)  # before any folder is read
    kw = {"scale": scale, "test_root": test_root}
    train = spec.read(root, "train", limit=limit_train, **kw)
    test = spec.read(root, "test", limit=limit_test, **kw)
    common = {"scale": scale, "device": device, "channels_last": channels_last, "num_workers": num_workers}
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
