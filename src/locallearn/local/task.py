"""What the network is trained to do. The engine and methods talk to a task, never to "classification" directly,
so super-resolution and detection plug into the same engine (design rule: nothing assumes classification)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """One training or evaluation batch.

    Attributes:
        input: the normalised network input, already on the device.
        target: the task target (class indices for classification).
        raw: the augmented input before normalisation as uint8 (for reconstruction losses), or None.
    """

    input: torch.Tensor
    target: torch.Tensor
    raw: torch.Tensor | None = None

    @cached_property
    def image01(self) -> torch.Tensor:
        """The un-normalised image in [0, 1], the target of InfoPro's decoder (spec §0.3, §2.6)."""
        if self.raw is None:
            raise ValueError("this batch carries no raw image; the loader must keep it for reconstruction losses")
        return self.raw.float().div_(255)

    def __len__(self) -> int:
        return len(self.target)


class ClassificationTask:
    """Cross-entropy on class logits; ``correct`` counts top-1 hits for accuracy."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch.target)

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (logits.argmax(1) == batch.target).sum()
