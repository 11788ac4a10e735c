"""A one-stage FCOS-style detector on an ImageNet ResNet, as ordered units (docs/glcan.md, "Detection"; Tian et
al., FCOS, ICCV 2019).

Units: the ResNet's stem and blocks, then one ``FCOSHead`` unit (FPN + shared class/box towers). The FPN needs the
outputs of the last block of stages 2 and 3 (C3, C4) besides its own input (C5): those blocks are wrapped in
:class:`Tap`, which posts their output on a board the head reads. When the split puts a tap and the head in
different local modules, the tap is detached (``configure_split``), so the FPN and final head train on detached
C3/C4 exactly as MAN++'s RetinaNet does and no gradient crosses a module boundary; inside one module (E2E)
the FPN's gradient flows into C3/C4 as usual.

Every prediction is self-describing: the output is (B, P, num_classes + 8) with, per point, the class logits,
the box distances (l, t, r, b) in pixels, the centerness logit, and the point's (x, y, stride). Aux heads at any
pyramid level emit the same layout, so one task loss (:mod:`locallearn.tasks.detection`) serves all of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .imagenet_resnet import imagenet_resnet
from .registry import register_model
from .units import UnitBackbone, UnitInfo


class Tap(nn.Module):
    """Runs ``unit`` and posts its output on ``board[key]`` for a later unit (detached if ``detach``). The reader
    takes it off the board, so no activation outlives the forward that made it (a checkpointed recomputation posts
    it again; the next forward replaces it)."""

    def __init__(self, unit: nn.Module, board: dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.unit, self.key, self.detach = unit, key, True
        self.board = board  # a plain dict shared with the reader: not a submodule, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unit(x)
        self.board[self.key] = y.detach() if self.detach else y
        return y


def _conv_gn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))


class DenseHead(nn.Module):
    """FCOS's head on one feature map: a class tower → logits, a box tower → (l, t, r, b) and centerness.
    Output (B, H·W, num_classes + 8) in the self-describing layout of the module docstring."""

    def __init__(self, width: int, num_classes: int, depth: int = 2, prior: float = 0.01) -> None:
        super().__init__()
        self.cls_tower = nn.Sequential(*[_conv_gn(width, width) for _ in range(depth)])
        self.box_tower = nn.Sequential(*[_conv_gn(width, width) for _ in range(depth)])
        self.cls = nn.Conv2d(width, num_classes, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        self.ctr = nn.Conv2d(width, 1, 3, padding=1)
        nn.init.constant_(self.cls.bias, -math.log((1 - prior) / prior))  # focal-loss prior

    def forward(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        b, _, h, w = x.shape
        box_features = self.box_tower(x)
        ltrb = torch.exp(self.box(box_features).float().clamp(max=8.0)) * stride
        parts = [self.cls(self.cls_tower(x)).float(), ltrb, self.ctr(box_features).float()]
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        points = torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride, torch.full_like(xs, stride)]).float()
        parts.append(points.unsqueeze(0).expand(b, -1, -1, -1))
        return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)


class LevelHead(nn.Module):
    """A dense head run at one fixed stride: GLCAN's global part for a module whose output has that stride."""

    def __init__(self, head: nn.Module, stride: int) -> None:
        super().__init__()
        self.head, self.stride = head, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x, self.stride)


class FCOSHead(nn.Module):
    """FPN over (C3, C4, C5) → P3, P4, P5, then one :class:`DenseHead` shared across levels.

    GLCAN hooks (:mod:`locallearn.methods.glcan`): the global part an aux net copies is the dense head
    (``glcan_source``), fed by the local adapter at the FPN width and the module's own stride
    (``glcan_target``) and run at that stride (``glcan_wrap``): each module predicts on the pyramid level of its
    stride, as MAN++'s aux detectors do (docs/glcan.md, "Detection").
    """

    def __init__(
        self, board: dict[str, torch.Tensor], channels: tuple[int, int, int], strides: tuple[int, int, int],
        width: int, num_classes: int, depth: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.board, self.strides, self.width = board, strides, width
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in channels)
        self.head = DenseHead(width, num_classes, depth)

    def glcan_source(self) -> nn.Module:
        return self.head

    def glcan_target(self, info: UnitInfo) -> UnitInfo:
        return UnitInfo(f"{info.name}->fpn", self.width, info.stage, info.reduction)

    def glcan_wrap(self, head: nn.Module, info: UnitInfo) -> nn.Module:
        return LevelHead(head, info.reduction)

    def forward(self, c5: torch.Tensor) -> torch.Tensor:
        features = [self.board.pop("C3"), self.board.pop("C4"), c5]  # taken off: nothing kept between steps
        p = self.lateral[2](c5)
        levels = [p]
        for i in (1, 0):  # top-down: upsample and add the lateral of the finer map
            p = self.lateral[i](features[i]) + F.interpolate(p, size=features[i].shape[-2:], mode="nearest")
            levels.insert(0, p)
        return torch.cat([self.head(s(p), st) for s, p, st in zip(self.smooth, levels, self.strides)], dim=1)


class DetectorBackbone(UnitBackbone):
    """A :class:`UnitBackbone` whose FPN taps learn where the local modules end (``configure_split``)."""

    def _crossing_taps(self, ends: list[int]) -> list[Tap]:
        """The taps in another module than the head's."""
        module_of = [sum(1 for e in ends if e <= i) for i in range(len(self.units))]
        head = module_of[len(self.units) - 1]
        return [unit for i, unit in enumerate(self.units) if isinstance(unit, Tap) and module_of[i] != head]

    def configure_split(self, ends: list[int]) -> None:
        crossing = self._crossing_taps(ends)
        for unit in self.units:
            if isinstance(unit, Tap):
                unit.detach = unit in crossing

    def cross_module_reads(self, ends: list[int]) -> list[str]:
        return [tap.key for tap in self._crossing_taps(ends)]


def fcos_resnet(
    depth: int = 18, num_classes: int = 3, in_channels: int = 3, width: int = 16, fpn_width: int | None = None
) -> DetectorBackbone:
    """FCOS on ImageNet ResNet-``depth`` (stem/first-stage ``width``): strides 8/16/32 from stages 2/3/4."""
    resnet = imagenet_resnet(depth, num_classes=2, in_channels=in_channels, width=width)
    units, infos = list(resnet.units)[:-1], list(resnet.infos)[:-1]
    board: dict[str, torch.Tensor] = {}
    last = {stage: max(i for i, info in enumerate(infos) if info.stage == stage) for stage in (2, 3, 4)}
    for key, stage in (("C3", 2), ("C4", 3)):
        units[last[stage]] = Tap(units[last[stage]], board, key)
    channels = tuple(infos[last[s]].channels for s in (2, 3, 4))
    strides = tuple(infos[last[s]].reduction for s in (2, 3, 4))
    fpn = fpn_width or 4 * width
    units.append(FCOSHead(board, channels, strides, fpn, num_classes))
    infos.append(UnitInfo("fcos_head", num_classes, 5, strides[0], is_head=True))
    return DetectorBackbone(units, infos, in_channels, num_stages=4)


@register_model("fcos_resnet18")
def fcos_resnet18(**kwargs) -> DetectorBackbone:
    """FCOS-style detector on ResNet-18 (width 16, FPN 64 by default: CPU-sized)."""
    return fcos_resnet(18, **kwargs)
