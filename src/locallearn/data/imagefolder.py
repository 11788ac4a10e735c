"""ImageNet-style class folders, ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``, registered as
``imagenet`` and ``imagefolder`` (any class-folder dataset; set ``data.root``). Design and recipe:
docs/data.md, "Class folders (ImageNet)".

Too large to keep resident, so images are decoded with Pillow in ``data.num_workers`` DataLoader processes, one
fused crop + resize each (``draft`` lets JPEG decode at 1/2, 1/4 or 1/8 scale when the crop allows it), and
collated as uint8; the flip, the normalisation and channels_last happen on the device. Recipe (InfoPro's
ImageNet scripts): training RandomResizedCrop (scale 0.08–1, aspect 3/4–4/3, torchvision's 10 tries then a
clamped centre crop) to ``image_size`` (224) + horizontal flip; evaluation resizes the short side to
``image_size / 0.875`` (256) and centre-crops ``image_size``. ImageNet mean/std.

Classes are the sorted sub-folders of ``train/``; their count is the dataset's class count, never assumed from
the name (a 100-class subset under ``imagenet`` trains a 100-way head). ``val/`` (or ``test/``) must use the same
folder names. The official ILSVRC2012 validation images come flat and must first be sorted into class folders.

Batches are ``(x, y, raw)`` like :class:`~locallearn.data.loader.ResidentLoader`'s, and just as reproducible:
the epoch's order comes from ``(seed, epoch)``, a sample's crop from ``(seed, epoch, index)``, a batch's flips
from ``(seed, epoch, batch)``, so results do not depend on the worker count and a resumed run sees the same
batches. A missing or empty folder or an unreadable image is a one-line :class:`DataError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import DatasetSpec, find_root, register_dataset
from .idx import DataError
from .loader import Triple, batches_per_epoch, seeded_generator, uint8_normaliser

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}
CROP_FRACTION = 0.875  # 224 of 256: evaluation resize (short side) = image_size / 0.875
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # RandomResizedCrop's area fraction and aspect ratio ranges
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels of the full-size image


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """One split: image paths (sorted by class, then path), their class indices, and the class names."""

    folder: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]

    def subset(self, limit: int | None) -> FolderIndex:
        """``limit`` images spread evenly over the split (so every class keeps some), or all of them."""
        if not limit or limit >= len(self.paths):
            return self
        keep = np.unique(np.linspace(0, len(self.paths) - 1, limit).round().astype(np.int64))
        return dataclasses.replace(self, paths=tuple(self.paths[i] for i in keep), labels=self.labels[keep])


def split_folder(root: Path, split: str) -> Path:
    """``root/train`` for ``train``; ``root/val`` (else ``root/test``) for ``test``."""
    candidates = [root / name for name in SPLIT_FOLDERS[split]]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def scan_split(folder: Path, classes: Sequence[str] | None = None) -> FolderIndex:
    """Index ``folder/<class>/**/<image>``. ``classes``: the training split's, which the folders must use."""
    layout = f"expected {folder}/<class>/<image> (ImageNet layout: train/ and val/, one sub-folder per class)"
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; {layout}")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"{folder}: no class folders; {layout}")
    classes = tuple(found if classes is None else classes)
    lookup = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        if name not in lookup:
            raise DataError(
                f"{folder / name}: class folder not among the {len(classes)} training classes; train/ and val/ "
                "must use the same class folder names"
            )
        files = sorted(
            os.path.join(top, f)
            for top, _, names in os.walk(folder / name, followlinks=True)
            for f in names
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(f"{folder / name}: class folder holds no images (.jpg, .jpeg, .png, ...); add or remove it")
        paths += files
        labels += [lookup[name]] * len(files)
    return FolderIndex(folder, tuple(paths), np.asarray(labels, dtype=np.int64), classes)


def random_resized_box(width: int, height: int, rng: np.random.Generator) -> Box:
    """The crop torchvision's RandomResizedCrop draws: an area fraction in ``SCALE`` and a log-uniform aspect ratio in
    ``RATIO``, up to 10 tries; then the whole image centre-cropped to the nearest allowed aspect ratio."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    if width / height < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int, size: int, resize: int) -> Box:
    """The region that "resize the short side to ``resize``, centre-crop ``size``" keeps, in original pixels."""
    if width <= height:
        rw, rh = resize, int(resize * height / width)
    else:
        rw, rh = int(resize * width / height), resize
    left, top = round((rw - size) / 2), round((rh - size) / 2)
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def decode(path: str, size: int, box_of: Callable[[int, int], Box]) -> np.ndarray:
    """Decode ``path`` and return the ``box_of(width, height)`` region resized (bilinear) to uint8 (size, size, 3).

    ``draft`` asks the JPEG decoder for the smallest power-of-two reduction that still leaves the region at least
    ``size`` pixels wide and high, and the crop and resize are one ``resize(box=...)``."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        box = box_of(width, height)
        need = (math.ceil(width * size / (box[2] - box[0])), math.ceil(height * size / (box[3] - box[1])))
        img.draft("RGB", need)
        sx, sy = img.size[0] / width, img.size[1] / height
        rgb = img.convert("RGB")
        scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR, box=scaled))


class _FolderDataset(Dataset):
    """``dataset[(index, epoch)]`` → (uint8 HWC image or None, label, error or None), in a worker process.

    A decode error is returned, not raised: DataLoader would re-raise it wrapped in a multi-line traceback."""

    def __init__(self, index: FolderIndex, size: int, resize: int, train: bool, seed: int) -> None:
        self.index, self.size, self.resize, self.train, self.seed = index, size, resize, train, seed

    def __len__(self) -> int:
        return len(self.index.paths)

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray | None, int, str | None]:
        i, epoch = key
        path, label = self.index.paths[i], int(self.index.labels[i])
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            box_of: Callable[[int, int], Box] = lambda w, h: random_resized_box(w, h, rng)  # noqa: E731
        else:
            box_of = lambda w, h: center_box(w, h, self.size, self.resize)  # noqa: E731
        try:
            return decode(path, self.size, box_of), label, None
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            return None, label, f"{path}: cannot decode the image ({reason}); the file is corrupt, replace or delete it"


def _collate(samples: list[tuple[np.ndarray | None, int, str | None]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """uint8 (B, C, H, W) images (channels_last strides), int64 labels, and the decode errors (empty if none)."""
    errors = [error for _, _, error in samples if error]
    if errors:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), errors
    images = torch.from_numpy(np.stack([image for image, _, _ in samples])).permute(0, 3, 1, 2)
    return images, torch.tensor([label for _, label, _ in samples], dtype=torch.int64), []


class EpochBatches:
    """DataLoader's batch sampler: the ``(index, epoch)`` keys of the batches of the current pass (set by
    :meth:`FolderLoader.batches` before each pass, and read in the main process when the pass starts)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderLoader:
    """Batches of ``(input, target, raw_uint8)`` on ``device`` from a :class:`FolderIndex` (same interface as
    :class:`~locallearn.data.loader.ResidentLoader`: ``batches(epoch, start)``, ``len``, ``n``, ``batch_size``).

    Args:
        train: shuffle, RandomResizedCrop and (``flip``) horizontal flips; else resize + centre crop in order.
        size: output side (224). resize: evaluation short side (default ``size / 0.875``).
        num_workers: decoding processes (0 = in this process), each prefetching 4 batches.
    """

    def __init__(
        self,
        index: FolderIndex,
        batch_size: int,
        *,
        train: bool,
        size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        flip: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
        num_workers: int = 0,
        resize: int | None = None,
    ) -> None:
        if batch_size < 1 or size < 1 or num_workers < 0:
            raise ValueError(
                f"batch size and image size must be >= 1, num_workers >= 0; got {batch_size}/{size}/{num_workers}"
            )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"class-folder images are decoded as RGB: give 3 mean and std values, got {mean}, {std}")
        self.index, self.n, self.batch_size = index, len(index.paths), batch_size
        self.train, self.flip, self.seed, self.size = train, flip and train, seed, size
        self.device, self.channels_last = torch.device(device), channels_last
        resize = resize or round(size / CROP_FRACTION)
        self._sampler = EpochBatches()
        # Workers start per pass and stop when it ends, early (max_steps) or on an error: persistent ones would
        # outlive an abandoned pass with batches in flight and stall the interpreter's exit. Starting workers once
        # per pass is negligible next to an ImageNet epoch (the usual advice is persistent workers; see above).
        workers = dict(prefetch_factor=4) if num_workers else {}
        self._loader = DataLoader(
            _FolderDataset(index, size, resize, train, seed),
            batch_sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            **workers,
        )
        self.mean, self.inv_std = uint8_normaliser(mean, std, self.device)

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.train)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Triple]:
        """Yield the batches of ``epoch`` from batch index ``start`` on (used to resume mid-epoch)."""
        order = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch)).tolist() if self.train else None
        bs = self.batch_size
        self._sampler.batches = [
            [(i if order is None else order[i], epoch) for i in range(b * bs, min((b + 1) * bs, self.n))]
            for b in range(start, len(self))
        ]
        passing = iter(self._loader)
        try:
            for b, (images, labels, errors) in enumerate(passing, start=start):
                if errors:
                    raise DataError(errors[0])
                raw = images.to(self.device, non_blocking=True)
                if self.flip:
                    flips = torch.rand(len(raw), generator=seeded_generator(self.seed, epoch, b, 1)) < 0.5
                    raw = torch.where(flips.to(self.device)[:, None, None, None], raw.flip(3), raw)
                x = raw.float()
                x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
                yield x.sub_(self.mean).mul_(self.inv_std), labels.to(self.device, non_blocking=True), raw
        finally:
            del passing  # the last reference: its workers shut down now, not at garbage collection

    def __iter__(self) -> Iterator[Triple]:
        return self.batches(0)


def build_loaders(spec: DatasetSpec, data: Any, device: torch.device, seed: int, channels_last: bool):
    """The (train, test) :class:`FolderLoader` of a class-folder dataset, and its spec with the class count and
    image size found/configured (``data`` is the run's ``DataCfg``). Called by ``train.build.build_loaders``."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError(
            f"{spec.name}: reading image folders needs Pillow: pip install 'locallearn[imagenet]'"
        ) from None
    if data.pad or data.pad_mode:
        raise DataError(f"{spec.name}: data.pad/pad_mode do not apply to class folders (RandomResizedCrop); unset them")
    root = find_root(spec, data.root)
    train_index = scan_split(split_folder(root, "train"))
    test_index = scan_split(split_folder(root, "test"), train_index.classes)
    size = data.image_size or spec.size
    common: dict[str, Any] = dict(
        size=size,
        mean=spec.mean,
        std=spec.std,
        seed=seed,
        device=device,
        channels_last=channels_last,
        num_workers=data.num_workers,
    )
    flip = spec.flip if data.flip is None else data.flip
    train = FolderLoader(train_index.subset(data.limit_train), data.batch_size, train=True, flip=flip, **common)
    test = FolderLoader(test_index.subset(data.limit_test), data.eval_batch_size, train=False, **common)
    return train, test, dataclasses.replace(spec, num_classes=len(train_index.classes), size=size)


def _streamed(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    raise DataError(f"{root}: class-folder datasets are streamed by their loader (data.num_workers), not read whole")


for _name, _hint in (
    ("imagenet", "point data.root at the ILSVRC2012 folder holding train/ and val/, one sub-folder per class"),
    ("imagefolder", "point data.root at a folder holding train/ and val/, one sub-folder of images per class"),
):
    register_dataset(
        DatasetSpec(
            name=_name,
            # Nominal (ILSVRC2012) until the folders are read: the loaders replace it by the number of class folders.
            # Only data-free tools (``locallearn summary``) use it.
            num_classes=1000,
            channels=3,
            size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pad=0,
            pad_mode="zero",
            flip=True,
            default_roots=(f"data/{_name}",),
            read=_streamed,
            hint=_hint,
            loaders=build_loaders,
        )
    )
