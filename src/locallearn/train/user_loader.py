"""Your own ``DataLoader`` (or any re-iterable of batches) as a loader the trainer can drive (docs/api.md, "Your
own model and DataLoader").

The trainer asks a loader for ``len()``, ``batch_size``, ``n`` (samples per epoch) and ``batches(epoch, start)``.
:class:`UserLoader` answers from the loader's own ``batch_size`` and dataset length, moves each batch to the
device (images in channels_last when the run wants it) and accepts ``(input, target)`` or ``(input, target,
raw_uint8)`` items. For a run that resumes on the batches it would have seen, a shuffling ``DataLoader`` draws
each epoch's order from a generator seeded by (data seed, epoch): its ``RandomSampler``'s generator (and the
``DataLoader``'s, which seeds its workers) are replaced before each epoch; a resumed epoch skips the batches it
has trained on by iterating past them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from ..data.loader import seeded_generator
from ..tasks.task import Batch


def as_loader(data: Any, batch_size: int, train: bool) -> Any:
    """What ``fit`` was given as a loader: a ``DataLoader`` or a list of batches as they are; a ``Dataset`` batched
    by ``batch_size`` (shuffled for training, each epoch's order then seeded by :class:`UserLoader`); ``(inputs,
    targets)`` tensors (or ``(inputs, targets, raw_uint8)``) as a ``TensorDataset`` batched the same way."""
    if isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(torch.is_tensor(t) for t in data):
        if len({len(t) for t in data}) != 1:
            raise ValueError(
                f"the tensors given as data have {[len(t) for t in data]} samples; give each one per sample"
            )
        data = TensorDataset(*data)
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=train)
    return data


class UserLoader:
    """``loader`` (a ``DataLoader`` or a list of batches) on ``device``; ``seed``: the run's data stream."""

    def __init__(self, loader: Iterable[Any], device: torch.device, channels_last: bool = True, seed: int = 0) -> None:
        if not hasattr(loader, "__len__"):
            raise ValueError(
                f"the loader ({type(loader).__name__}) has no len(): pass a DataLoader over a map-style dataset, or a "
                "list of batches, so that an epoch has a known number of steps"
            )
        self.loader, self.device, self.channels_last, self.seed = loader, torch.device(device), channels_last, seed
        self.reseed(0)  # (a peek at the first batch must not draw on torch's global RNG either)
        first = next(iter(loader), None)
        if first is None:
            raise ValueError("the loader yields no batch; give it at least one")
        self.batch_size = getattr(loader, "batch_size", None) or len(first[1])
        dataset = getattr(loader, "dataset", None)
        self.n = len(dataset) if hasattr(dataset, "__len__") else len(loader) * self.batch_size
        if getattr(loader, "drop_last", False):
            self.n = len(loader) * self.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def reseed(self, epoch: int) -> None:
        """This epoch's shuffling order from (seed, epoch) alone (module doc)."""
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, RandomSampler):
            sampler.generator = seeded_generator(self.seed, epoch)
        if getattr(self.loader, "generator", None) is not None or getattr(self.loader, "num_workers", 0):
            self.loader.generator = seeded_generator(self.seed, epoch, 1)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Any, Any, Any]]:
        """Epoch ``epoch`` from batch ``start`` on, each as ``(input, target, raw)`` on the device."""
        self.reseed(epoch)
        for i, item in enumerate(self.loader):
            if i < start:
                continue
            batch = Batch.of(item, self.device, self.channels_last)
            yield batch.input, batch.target, batch.raw
