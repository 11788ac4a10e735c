"""ImageNet ResNet-18/34/50/101/152 (He et al., 2016) as ordered units (docs/methods.md, "Splits").

Units: stem (7×7 stride-2 conv, BN, ReLU, 3×3 stride-2 max-pool), every residual block of the four stages
(BasicBlock for 18/34, Bottleneck with expansion 4 for 50/101/152; stride on the 3×3 conv, "v1.5"), head (GAP,
FC). Any input size and channel count; ``width`` is the stem/first-stage width (64 in the papers), stage widths
are ``width·(1, 2, 4, 8)`` (times 4 at a Bottleneck's output). Registered as ``resnet18`` … ``resnet152``.

The papers' ImageNet splits (InfoPro* K=2, MAN K=2/4, HPFF K=4/8, MLAAN) are positions ``[stage, block]`` in this
unit list: unit 0 is the stem, stage s block j is unit ``1 + sum(blocks[:s-1]) + j``; the head is the last unit.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .cifar_resnet import BasicBlock, Head, projection_shortcut
from .registry import register_model
from .units import UnitBackbone, UnitInfo

LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class ImageNetStem(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4, each with BN; projection shortcut when the shape
    changes."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = projection_shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """Conv: Kaiming normal, fan_out, ReLU gain; BN: γ=1, β=0; Linear keeps torch's default. With
    ``zero_init_residual`` the last BN of every residual branch starts at γ=0 (each block starts as identity)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def imagenet_resnet(
    depth: int, num_classes: int = 1000, in_channels: int = 3, width: int = 64, zero_init_residual: bool = False
) -> UnitBackbone:
    """Build ImageNet ResNet-``depth`` (18, 34, 50, 101, 152) as ordered units: stem, every block, head."""
    if depth not in LAYERS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(LAYERS)}, got {depth}")
    if width < 1:
        raise ValueError(f"model.width must be >= 1 (64 for the papers' ImageNet ResNets), got {width}")
    kind, blocks = LAYERS[depth]
    units: list[nn.Module] = [ImageNetStem(in_channels, width)]
    infos = [UnitInfo("stem", width, 0, 4)]
    cin, reduction = width, 4
    for stage, n in enumerate(blocks, start=1):
        planes = width * 2 ** (stage - 1)
        for j in range(n):
            stride = 2 if (stage > 1 and j == 0) else 1
            reduction *= stride
            if kind == "basic":
                block: nn.Module = BasicBlock(cin, planes, stride)
                cout = planes
            else:
                block = Bottleneck(cin, planes, stride)
                cout = planes * Bottleneck.expansion
            units.append(block)
            infos.append(UnitInfo(f"layer{stage}.{j}", cout, stage, reduction))
            cin = cout
    units.append(Head(cin, num_classes))
    infos.append(UnitInfo("head", num_classes, 5, reduction, is_head=True))
    model = UnitBackbone(units, infos, in_channels, num_stages=4)
    _init_weights(model, zero_init_residual)
    model.weight_init = partial(_init_weights, zero_init_residual=False)
    return model


def _make(depth: int):
    def build(**kwargs) -> UnitBackbone:
        return imagenet_resnet(depth, **kwargs)

    build.__doc__ = f"ImageNet ResNet-{depth} ({LAYERS[depth][0]} blocks {LAYERS[depth][1]})."
    return build


for _depth in LAYERS:
    register_model(f"resnet{_depth}")(_make(_depth))
