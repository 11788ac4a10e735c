"""A device-resident loader for small-image datasets, airbench style (docs/data.md, "The device-resident loader").

The uint8 images live on the device, padded once. Each batch: index → random crop (one vectorised gather for the
whole batch, horizontal flip folded into the column index) → float → normalise → channels_last.

Randomness is a pure function of ``(seed, epoch, batch index)``: the permutation of an epoch and the crops of a
batch come from generators seeded by those numbers alone. So data order and augmentation never depend on model
initialisation or on which method trains, and a run resumed at any step sees exactly the batches it would have
seen (no generator state to checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def seeded_generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def uint8_normaliser(mean, std, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(255·mean, 1/(255·std)) shaped (1, C, 1, 1): ``(x_uint8 - a) * b`` normalises in one pass."""
    shape = (1, len(mean), 1, 1)
    scaled_mean = torch.tensor(mean, dtype=torch.float32, device=device).view(shape) * 255
    return scaled_mean, 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(shape) * 255)


def batches_per_epoch(n: int, batch_size: int, train: bool) -> int:
    """A trailing training batch of one sample is dropped (BatchNorm cannot train on it)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > (1 if train else 0) else 0)


class ResidentLoader:
    """Batches of ``(input, target, raw_uint8)`` on ``device``.

    Args:
        images: uint8 (N, C, H, W). labels: int64 (N,).
        train: shuffle and augment (crop with ``pad``/``pad_mode``, ``flip``) when True; fixed order otherwise.
        mean, std: per-channel normalisation in [0, 1] units.
        seed: the data stream's seed (independent of model seeds).
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pad: int = 0,
        pad_mode: str = "zero",
        flip: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if pad_mode not in ("zero", "reflect"):
            raise ValueError(f"data.pad_mode must be 'zero' or 'reflect', got {pad_mode!r}")
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        self.n, self.c, self.h, self.w = images.shape
        self.pad = pad if train else 0
        if self.pad and pad_mode == "reflect" and self.pad >= min(self.h, self.w):
            raise ValueError(f"reflect padding {self.pad} needs images larger than {self.pad} px")
        padded = images
        if self.pad:
            mode = "constant" if pad_mode == "zero" else "reflect"
            padded = F.pad(images.float(), [self.pad] * 4, mode=mode).to(torch.uint8)
        self.images = padded.to(self.device)
        self.batch_size, self.train, self.flip, self.seed = batch_size, train, flip and train, seed
        self.channels_last = channels_last
        if len(mean) != self.c or len(std) != self.c:
            raise ValueError(f"{len(mean)} mean and {len(std)} std values for {self.c}-channel images")
        self.mean, self.inv_std = uint8_normaliser(mean, std, self.device)

    def __len__(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.train)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Triple]:
        """Yield the batches of ``epoch`` from batch index ``start`` on (used to resume mid-epoch)."""
        if self.train:
            order = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch)).to(self.device)
        else:
            order = torch.arange(self.n, device=self.device)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            raw = self._augment(idx, seeded_generator(self.seed, epoch, i, 1)) if self.train else self.images[idx]
            x = raw.float()
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x.sub_(self.mean).mul_(self.inv_std), self.labels[idx], raw

    def __iter__(self) -> Iterator[Triple]:
        return self.batches(0)

    def _augment(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, dev = len(idx), self.device
        rows = torch.arange(self.h, device=dev).expand(b, -1)
        cols = torch.arange(self.w, device=dev).expand(b, -1)
        if self.pad:
            offsets = torch.randint(0, 2 * self.pad + 1, (2, b), generator=gen).to(dev)
            rows = rows + offsets[0, :, None]
            cols = cols + offsets[1, :, None]
        if self.flip:
            flipped = (torch.rand(b, generator=gen) < 0.5).to(dev)
            cols = torch.where(flipped[:, None], cols.flip(1), cols)
        if not self.pad and not self.flip:
            return self.images[idx]
        chans = torch.arange(self.c, device=dev)
        return self.images[
            idx[:, None, None, None], chans[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]
        ]
