"""Models as users write them (not locallearn's zoo): a torchvision-style ResNet-50, a U-Net with three skip
connections, a ViT with a class token and position embedding returning a dataclass, and models that must be
refused. Importable as ``tests.user_models:<builder>`` for ``model.name`` in CLI tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (stem, four Bottleneck stages with downsample branches, avgpool, ``fc``)."""

    def __init__(
        self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 10, in_channels: int = 1, width: int = 64
    ) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, in_channels, width)


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder → bottleneck → decoder; the decoder reads the three encoder outputs through skip connections. The
    head averages the per-pixel class map, so the net classifies (and still has a dense path)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        c = width
        self.enc1, self.enc2, self.enc3 = double_conv(in_channels, c), double_conv(c, 2 * c), double_conv(2 * c, 4 * c)
        self.bottleneck = double_conv(4 * c, 8 * c)
        self.up3, self.dec3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, 2), double_conv(8 * c, 4 * c)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2), double_conv(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * c, c, 2, 2), double_conv(2 * c, c)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        b = self.bottleneck(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(b), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1).mean((2, 3))


def unet(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> UNet:
    return UNet(num_classes, in_channels, width)


@dataclass
class ViTOutput:
    tokens: torch.Tensor
    logits: torch.Tensor


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + F.dropout(self.attn(y, y, y, need_weights=False)[0], self.drop, self.training)  # reads self.training
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, a class token, a learned position embedding, ``depth`` blocks; returns a dataclass."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image: int = 28,
        patch: int = 7,
        dim: int = 32,
        depth: int = 4,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, 4, 0.1) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> ViTOutput:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return ViTOutput(tokens=x, logits=self.head(x[:, 0]))


def vit(num_classes: int = 10, in_channels: int = 1, image: int = 28) -> ViT:
    return ViT(num_classes, in_channels, image)


class DataDependent(nn.Module):
    """Branches on a tensor's value: fx cannot capture it unless the branching submodule is kept opaque."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.stem(x)).mean((2, 3)))


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.mean() > 0 else x


class Looped(nn.Module):
    """One block applied three times (a weight-shared loop), then a second block and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = double_conv(4, 4)
        self.last = double_conv(4, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(3):
            x = self.shared(x)
        return self.fc(self.pool(self.last(x)).flatten(1))


class SizeEarly(nn.Module):
    """Reads the batch size at the top of forward and uses it in the head: a non-tensor value crosses every cut."""

    def __init__(self) -> None:
        super().__init__()
        self.block1, self.block2 = double_conv(1, 4), double_conv(4, 4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.fc(self.block2(self.block1(x)).reshape(n, 4, -1).mean(-1))


class Tied(nn.Module):
    """``proj`` is used by the first and the third block: one parameter, two places."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 4, 1)
        self.block1, self.block2, self.block3 = double_conv(1, 4), double_conv(4, 4), double_conv(4, 4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x) + 0
        x = self.block2(self.proj(x))
        x = self.block3(self.proj(x))
        return self.fc(x.mean((2, 3)))


class DataGate(nn.Module):
    """Branches on the data: torch.fx cannot trace it (a proxy has no truth value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x * 2
        return x


class Gated(nn.Module):
    """A small classifier with a data-dependent gate between two convolutions."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.gate = DataGate()
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.gate(self.stem(x))).mean((2, 3)))


def gated(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> Gated:
    return Gated(num_classes, in_channels, width)


class DropPathBlock(nn.Module):
    """A residual block with stochastic depth as research code writes it: one coin per sample from
    ``torch.rand(x.shape[0], 1, 1, 1)`` while training (torch.fx cannot trace the size into ``torch.rand``)."""

    def __init__(self, width: int, drop: float) -> None:
        super().__init__()
        self.body = double_conv(width, width)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.training and self.drop > 0:
            keep = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop).to(y.dtype)
            y = y * keep / (1 - self.drop)
        return x + y


class StochasticDepth(nn.Module):
    """Four drop-path blocks (drop rising to 0.3) and dropout before the classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.stem = double_conv(in_channels, width)
        self.blocks = nn.Sequential(*(DropPathBlock(width, 0.1 * i) for i in range(4)))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.blocks(self.stem(x)).mean((2, 3))))


def stochastic_depth(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> StochasticDepth:
    return StochasticDepth(num_classes, in_channels, width)
