"""Object detection as a task: FCOS targets, focal + GIoU + centerness losses, decoding, COCO mAP (Tian et
al., FCOS, ICCV 2019; docs/glcan.md, "Detection").

Predictions come in the self-describing layout of :mod:`locallearn.models.detector`: (B, P, C + 8) with class
logits, box distances (l, t, r, b) in pixels, a centerness logit and the point's (x, y, stride). The same loss
therefore trains the final multi-level head and a single-level aux head of any module (docs/glcan.md, "Detection":
each module's aux detector predicts on the level of its stride, as MAN++'s RetinaNet does). Targets are the padded
(B, M, 5) ``[label, x1, y1, x2, y2]`` tensors of :mod:`locallearn.data.detection` (label −1 = padding).

Assignment (FCOS with center sampling): a point is positive for a box when it lies inside the box and within
1.5 strides of its centre, and, when several levels predict, the box's largest (l, t, r, b) falls in the level's
range (up to 2·stride for all but the coarsest level, which takes the rest); ties go to the smallest box.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.detection import DetectionSet, coco_map
from ..models.detector import DenseHead
from ..models.units import UnitInfo
from .task import Batch, Task


@torch.no_grad()  # targets: the points' coordinates are constants, the boxes are data
def assign(pred: torch.Tensor, target: torch.Tensor, radius: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (B, P) with −1 for background, matched boxes (B, P, 4)) for predictions ``pred``.

    Every shape follows (B, P, M) and none the data (no ``unique``, no indexing by a mask), so the assignment runs
    without a host sync and on the ``meta`` device (the estimator behind ``summary``)."""
    px, py, stride = pred[..., -3], pred[..., -2], pred[..., -1]  # (B, P)
    valid = target[..., 0] >= 0  # (B, M)
    boxes = target[..., 1:]  # (B, M, 4)
    x, y, s = px[..., None], py[..., None], stride[..., None]  # (B, P, 1)
    ltrb = torch.stack(
        [x - boxes[:, None, :, 0], y - boxes[:, None, :, 1], boxes[:, None, :, 2] - x, boxes[:, None, :, 3] - y], -1
    )  # (B, P, M, 4)
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    near = ((x - cx[:, None]).abs() < radius * s) & ((y - cy[:, None]).abs() < radius * s)
    ok = (ltrb.amin(-1) > 0) & near & valid[:, None, :]
    # Scale ranges: a level takes boxes whose largest distance exceeds 2x the next finer level's stride and is at
    # most 2x its own (the coarsest: no upper bound). The next finer stride is the largest one below the point's,
    # found in the sorted strides; with a single level (an aux head) every size passes.
    ordered = stride.sort(-1).values
    below = torch.searchsorted(ordered, stride.contiguous())  # how many points have a smaller stride
    finer = ordered.gather(-1, (below - 1).clamp(min=0))
    lower = torch.where(below > 0, 2 * finer, torch.zeros_like(finer))[..., None]
    upper = torch.where(s >= stride.amax(-1, keepdim=True)[..., None], torch.full_like(s, float("inf")), 2 * s)
    reach = ltrb.amax(-1)
    ok &= (reach > lower) & (reach <= upper)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[:, None, :].expand_as(ok)
    area = torch.where(ok, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(-1)  # (B, P)
    labels = torch.gather(target[..., 0], 1, best).long()
    labels = torch.where(torch.isfinite(best_area), labels, torch.full_like(labels, -1))
    matched = torch.gather(boxes, 1, best[..., None].expand(-1, -1, 4))
    return labels, matched


def _boxes(pred: torch.Tensor) -> torch.Tensor:
    """Predicted xyxy boxes from points and distances."""
    x, y = pred[..., -3], pred[..., -2]
    l, t, r, b = pred[..., -8], pred[..., -7], pred[..., -6], pred[..., -5]  # noqa: E741
    return torch.stack([x - l, y - t, x + r, y + b], -1)


def giou_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − GIoU of paired xyxy boxes (elementwise)."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull_area = hull[..., 0] * hull[..., 1]
    iou = inter / union.clamp(min=1e-6)
    return 1 - (iou - (hull_area - union) / hull_area.clamp(min=1e-6))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression, best first (torchvision is not available here)."""
    order = scores.argsort(descending=True)
    keep = []
    while len(order):
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        if not len(rest):
            break
        a, b = boxes[i], boxes[rest]
        wh = (torch.minimum(a[2:], b[:, 2:]) - torch.maximum(a[:2], b[:, :2])).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
        overlap = inter / union.clamp(min=1e-6)
        order = rest[overlap <= iou]
    return torch.tensor(keep, dtype=torch.long)


class _MeanAP:
    """Collects decoded detections and ground truth on the host; mAP by pycocotools at ``compute``."""

    def __init__(self, task: DetectionTask) -> None:
        self.task, self.detections, self.gt_boxes, self.gt_labels, self.size = task, [], [], [], (1, 1)

    def update(self, output: torch.Tensor, batch: Batch) -> None:
        self.size = tuple(batch.input.shape[-2:])
        self.detections += self.task.decode(output, self.size)
        for t in batch.target.cpu():
            t = t[t[:, 0] >= 0]
            self.gt_boxes.append(t[:, 1:].numpy())
            self.gt_labels.append(t[:, 0].long().numpy())

    def compute(self) -> dict[str, float]:
        n = len(self.gt_boxes)
        gt = DetectionSet(np.zeros((n, 0, *self.size), np.uint8), self.gt_boxes, self.gt_labels, self.task.classes)
        gt.names = [str(i) for i in range(n)]
        return coco_map(gt, self.detections)


class DetectionTask(Task):
    """FCOS losses (sigmoid focal loss, GIoU weighted by centerness, centerness BCE) and COCO mAP."""

    kind, headline = "detection", "map"

    def __init__(self, classes: list[str], score_threshold: float = 0.05, nms_iou: float = 0.6, top_k: int = 100):
        if len(classes) < 1:
            raise ValueError("detection needs at least one class")
        self.classes, self.num_classes = list(classes), len(classes)
        self.score_threshold, self.nms_iou, self.top_k = score_threshold, nms_iou, top_k

    def loss(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Focal loss over every point and class / number of positives, GIoU weighted by the centerness target
        over the positives, centerness BCE / number of positives. The positive terms are computed on every point
        and weighted by a 0/1 mask instead of indexing the positives: the same sums, but no shape depends on the
        data (no host sync; the meta-device estimate runs it)."""
        pred = pred.float()
        labels, matched = assign(pred, batch.target.float())
        positive = (labels >= 0).float()
        num_pos = positive.sum().clamp(min=1)
        onehot = F.one_hot(labels.clamp(min=0), self.num_classes).float() * positive[..., None]
        cls = sigmoid_focal_loss(pred[..., : self.num_classes], onehot).sum() / num_pos
        with torch.no_grad():  # the centerness target, from the point and its box (1 off the positives, masked)
            x, y = pred[..., -3], pred[..., -2]
            ltrb = torch.stack([x - matched[..., 0], y - matched[..., 1], matched[..., 2] - x, matched[..., 3] - y], -1)
            ltrb = torch.where(positive[..., None] > 0, ltrb, torch.ones_like(ltrb))
            lr, tb = ltrb[..., [0, 2]], ltrb[..., [1, 3]]
            centerness = torch.sqrt((lr.amin(-1) / lr.amax(-1)) * (tb.amin(-1) / tb.amax(-1))) * positive
        box = (giou_loss(_boxes(pred), matched) * centerness).sum() / centerness.sum().clamp(min=1e-6)
        bce = F.binary_cross_entropy_with_logits(pred[..., -4], centerness, reduction="none")
        return cls + box + (bce * positive).sum() / num_pos

    @torch.no_grad()
    def decode(self, pred: torch.Tensor, size: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: (xyxy boxes, scores, labels) after thresholding, top-k and class-wise NMS."""
        pred = pred.float()
        scores = torch.sqrt(torch.sigmoid(pred[..., : self.num_classes]) * torch.sigmoid(pred[..., -4:-3]))
        boxes = _boxes(pred)
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, size[1])
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, size[0])
        out = []
        for s, b in zip(scores, boxes):
            point, label = torch.nonzero(s > self.score_threshold, as_tuple=True)
            score = s[point, label]
            top = score.argsort(descending=True)[: 10 * self.top_k]
            point, label, score = point[top], label[top], score[top]
            keep = []
            for c in label.unique():
                idx = torch.nonzero(label == c, as_tuple=True)[0]
                keep.append(idx[nms(b[point[idx]], score[idx], self.nms_iou)])
            keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
            keep = keep[score[keep].argsort(descending=True)[: self.top_k]]
            out.append((b[point[keep]].cpu().numpy(), score[keep].cpu().numpy(), label[keep].cpu().numpy()))
        return out

    def metrics(self) -> _MeanAP:
        return _MeanAP(self)

    def train_stat(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """mAP has no per-sample value, so there is no train metric: NaN, logged as ``train_map nan`` rather than a
        made-up 0 (the per-module train losses are the training signal to watch)."""
        return output.new_full((), float("nan"))

    def model_kwargs(self) -> dict[str, int]:
        return {"num_classes": self.num_classes}

    def plain_head(self, info: UnitInfo, image_channels: int) -> nn.Module:
        """DGL-style aux detector: a 1×1 projection, then a one-conv FCOS head at the map's own stride."""
        return PlainDetectionHead(info.channels, info.reduction, self.num_classes)


class PlainDetectionHead(nn.Module):
    def __init__(self, channels: int, stride: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Sequential(nn.Conv2d(channels, width, 1), nn.ReLU(inplace=True))
        self.head = DenseHead(width, num_classes, depth=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(h), self.stride)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """RetinaNet's focal loss, elementwise (Lin et al. 2017)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return (alpha * target + (1 - alpha) * (1 - target)) * ce * (1 - p_t) ** gamma
