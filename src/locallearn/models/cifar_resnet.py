"""CIFAR-style ResNet-(6n+2) exactly as InfoPro's ``networks/resnet.py`` (docs/methods.md, "The unit contract").

Units: stem (3×3 conv, BN, ReLU), every BasicBlock of the three stages, head (GAP, FC). Depths 20/32/44/56/110
are registered (plus 8 and 14 for quick CPU runs); ``width`` scales the (16, 32, 64) channel tuple.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import register_model
from .units import UnitBackbone, UnitInfo


class Stem(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
        )


class Subsample(nn.Module):
    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stride == 1 else x[:, :, :: self.stride, :: self.stride]


def projection_shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or 1×1 conv + BN when the block changes width or resolution.

    Subsample, then a stride-1 1×1 conv: the same function as a stride-2 1×1 conv, but torch 2.13's CPU (oneDNN)
    backward of a channels_last stride-2 1×1 conv corrupts the heap for narrow inputs (< 8 channels).
    """
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(Subsample(stride), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual; the first block of a stage projects with 1×1 conv + BN."""

    def __init__(self, cin: int, cout: int, stride: int, droprate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(droprate) if droprate > 0 else nn.Identity()
        self.shortcut = projection_shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.drop(out)))
        return self.relu(out + self.shortcut(x))


class Head(nn.Module):
    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _init_weights(model: nn.Module) -> None:
    """Conv: normal(0, sqrt(2 / (k·k·out))); BN: γ=1, β=0 (InfoPro's init). Linear keeps torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet(
    depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16, droprate: float = 0.0
) -> UnitBackbone:
    """Build ResNet-``depth`` (depth = 6n+2) as ordered units: stem, 3n blocks, head."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    widths = (width, width, 2 * width, 4 * width)
    units: list[nn.Module] = [Stem(in_channels, widths[0])]
    infos = [UnitInfo("stem", widths[0], 0, 1)]
    cin, reduction = widths[0], 1
    for stage in (1, 2, 3):
        for j in range(n):
            stride = 2 if (stage > 1 and j == 0) else 1
            reduction *= stride
            units.append(BasicBlock(cin, widths[stage], stride, droprate))
            infos.append(UnitInfo(f"layer{stage}.{j}", widths[stage], stage, reduction))
            cin = widths[stage]
    units.append(Head(cin, num_classes))
    infos.append(UnitInfo("head", num_classes, 4, reduction, is_head=True))
    model = UnitBackbone(units, infos, in_channels, num_stages=3)
    _init_weights(model)
    model.weight_init = _init_weights
    return model


def _make(depth: int):
    def build(**kwargs) -> UnitBackbone:
        return cifar_resnet(depth, **kwargs)

    build.__doc__ = f"CIFAR ResNet-{depth} (InfoPro's layout)."
    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(_make(_depth))
