"""What the network is trained to do. The engine and methods talk to a task, never to "classification" directly,
so super-resolution and detection plug into the same engine (design rule: nothing assumes classification).

A task supplies the loss of a prediction, a metric accumulator for evaluation (``metrics()``: ``update`` per
batch on the device, ``compute`` once at the end), the per-sample train statistic the engine sums without a host
sync (``train_stat``), what a backbone builder needs to fit it (``model_kwargs``) and the plainest aux head for
a feature map (``plain_head``: the DGL-style baseline, docs/glcan.md). ``headline`` names the metric a run is
judged by (``test_<headline>``, ``aux_<headline>`` by depth, ``train_<headline>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..models.edsr import SubPixelHead
from ..models.units import UnitInfo
from .image_quality import psnr_y, ssim_y


@dataclass
class Batch:
    """One training or evaluation batch.

    Attributes:
        input: the normalised network input, already on the device.
        target: the task target (class indices for classification, the HR image in [0, 1] for super-resolution).
        raw: the augmented input before normalisation as uint8 (for reconstruction losses), or None.
    """

    input: torch.Tensor
    target: torch.Tensor
    raw: torch.Tensor | None = None

    @classmethod
    def of(cls, item: Any, device: torch.device | None = None, channels_last: bool = False) -> Batch:
        """A batch from what a loader yields: a Batch, ``(input, target)`` or ``(input, target, raw)``, moved to
        ``device`` (images in channels_last when asked); anything else is one ValueError saying what is needed."""
        if isinstance(item, Batch):
            parts = (item.input, item.target, item.raw)
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3) and all(torch.is_tensor(t) for t in item[:2]):
            parts = (item[0], item[1], item[2] if len(item) == 3 else None)
        else:
            what = f"a {type(item).__name__}" + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
            raise ValueError(
                f"a batch must be (input, target) or (input, target, raw_uint8) tensors, got {what}; "
                "wrap your dataset so that it yields those (e.g. a DataLoader over a TensorDataset(x, y))"
            )
        if device is not None:
            parts = tuple(None if t is None else t.to(device, non_blocking=True) for t in parts)
        x = parts[0]
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return cls(x, parts[1], parts[2])

    @cached_property
    def image01(self) -> torch.Tensor:
        """The un-normalised image in [0, 1], the target of InfoPro's decoder (docs/methods.md, "Aux nets and
        local losses")."""
        if self.raw is None:
            raise ValueError("this batch carries no raw image; the loader must keep it for reconstruction losses")
        return self.raw.float().div_(255)

    def __len__(self) -> int:
        return len(self.target)


class Metric(Protocol):
    """Accumulates a metric over evaluation batches (sums stay on the device until ``compute``)."""

    def update(self, output: torch.Tensor, batch: Batch) -> None: ...

    def compute(self) -> dict[str, float]: ...


class Task:
    """The contract every task fulfils (see the module docstring)."""

    kind: str = ""
    headline: str = ""
    higher_is_better: bool = True

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self) -> Metric:
        raise NotImplementedError

    def train_stat(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Sum over the batch of the per-sample headline metric (a device scalar); the loop divides by samples."""
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments a backbone builder needs for this task (class count, upscaling factor)."""
        return {}

    def check(self, batch: Batch) -> None:
        """Refuse, with one line, targets this task cannot score (the engine asks once, on its first step)."""

    def plain_head(self, info: UnitInfo, image_channels: int) -> nn.Module:
        """The plainest aux head mapping a feature map described by ``info`` to a prediction."""
        raise NotImplementedError(f"the {self.kind} task has no plain aux head")


class _Accuracy:
    def __init__(self, task: ClassificationTask) -> None:
        self.task, self.correct, self.seen = task, None, 0

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        hits = self.task.correct(output, batch).float()
        self.correct = hits if self.correct is None else self.correct + hits
        self.seen += len(batch)

    def compute(self) -> dict[str, float]:
        return {"acc": 0.0 if self.correct is None else (self.correct / max(self.seen, 1)).item()}


class ClassificationTask(Task):
    """Cross-entropy on class logits; ``correct`` counts top-1 hits for accuracy."""

    kind, headline = "classification", "acc"

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"classification needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch.target)

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return (logits.argmax(1) == batch.target).sum()

    def metrics(self) -> Metric:
        return _Accuracy(self)

    def train_stat(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.correct(output, batch)

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def check(self, batch: Batch) -> None:
        target = batch.target
        if target.dtype.is_floating_point or target.dim() != 1:
            raise ValueError(
                f"classification targets are class indices (one integer per sample), got {tuple(target.shape)} "
                f"{target.dtype}"
            )
        if target.is_meta:  # (memory estimates run the engine on meta tensors: no values to check)
            return
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"the labels run from {low} to {high} but ClassificationTask({self.num_classes}) has classes "
                f"0..{self.num_classes - 1}; use ClassificationTask({max(high + 1, self.num_classes)})"
            )


class _ImageQuality:
    def __init__(self, shave: int) -> None:
        self.shave, self.psnr, self.ssim, self.seen = shave, None, None, 0

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        psnr = psnr_y(output, batch.target, self.shave).sum()
        ssim = ssim_y(output, batch.target, self.shave).sum()
        self.psnr = psnr if self.psnr is None else self.psnr + psnr
        self.ssim = ssim if self.ssim is None else self.ssim + ssim
        self.seen += len(batch)

    def compute(self) -> dict[str, float]:
        if self.psnr is None:
            return {"psnr": 0.0, "ssim": 0.0}
        return {"psnr": (self.psnr / self.seen).item(), "ssim": (self.ssim / self.seen).item()}


class SuperResolutionTask(Task):
    """Single-image super-resolution by ``scale``: L1 loss against the HR image (EDSR's loss), PSNR and SSIM on
    Y with a border crop of ``shave`` pixels (default: the scale, the usual benchmark convention).

    The model's output and the target are images in [0, 1]; metrics quantise both to 8 bits first
    (:mod:`.image_quality`).
    """

    kind, headline = "super_resolution", "psnr"

    def __init__(self, scale: int, shave: int | None = None) -> None:
        if scale < 1:
            raise ValueError(f"super-resolution scale must be >= 1, got {scale}")
        self.scale = scale
        self.shave = scale if shave is None else shave

    def loss(self, sr: torch.Tensor, batch: Batch) -> torch.Tensor:
        if sr.shape != batch.target.shape:
            raise ValueError(
                f"SR output {tuple(sr.shape)} does not match the HR target {tuple(batch.target.shape)}; "
                f"is the model built for scale {self.scale} (data.scale)?"
            )
        return F.l1_loss(sr.float(), batch.target.float())

    def metrics(self) -> Metric:
        return _ImageQuality(self.shave)

    def train_stat(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return psnr_y(output, batch.target, self.shave).sum()

    def model_kwargs(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def plain_head(self, info: UnitInfo, image_channels: int) -> nn.Module:
        """One conv + pixel shuffle from the feature map's grid to the HR grid (ESPCN-style)."""
        return SubPixelHead(info.channels, image_channels, self.scale * info.reduction)
