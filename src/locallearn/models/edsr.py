"""EDSR-style super-resolution network as ordered units (Lim et al., CVPR-W 2017; the SR backbone of GLCAN's SR
experiments; docs/glcan.md, "Backbone: EDSR as units").

Units: ``head`` (subtract the RGB mean, 3×3 conv to ``width``), ``blocks`` residual blocks
(conv–ReLU–conv, scaled by ``res_scale``, plus the identity; no BatchNorm, as EDSR), and ``tail``, the task head:
3×3 conv, the pixel-shuffle upsampler (×2 and ×4 as stages of conv C→4C + PixelShuffle(2), ×3 as conv C→9C +
PixelShuffle(3)), 3×3 conv to the image channels, add the mean back. Input is the LR image in [0, 1]; output is
the SR image in [0, 1] units, ``scale`` times larger.

Difference from EDSR: EDSR adds the head's output to the body's output (a long skip over all residual blocks).
A skip that spans every unit would cross every local-module boundary, carrying gradient between modules or a
detached copy of module 1's features into the last module, so it is left out; the per-block skips remain (as in
SRResNet without BN). Every unit keeps the LR grid (``UnitInfo.reduction`` 1); only the tail upsamples.

Registered: ``edsr4``, ``edsr8``, ``edsr16`` (EDSR-baseline depth; the paper's width is 64: ``model.width=64``) and
``edsr32`` (EDSR depth, ``res_scale`` 0.1; the paper's width is 256). ``model.width`` sets the feature width
(default 16 in the configs: CPU-sized).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import register_model
from .units import UnitBackbone, UnitInfo

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)  # EDSR's MeanShift constants (DIV2K training set)
UPSCALES = (2, 3, 4)  # what the sub-pixel upsampler builds: ×2 and ×3 in one step, ×4 as two ×2 steps


def default_mean(channels: int) -> tuple[float, ...]:
    """DIV2K's RGB mean for 3 channels, mid-grey otherwise."""
    return DIV2K_RGB_MEAN if channels == 3 else (0.5,) * channels


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class MeanShift(nn.Module):
    """Adds ``sign × mean`` per channel (a (1, C, 1, 1) buffer: device-agnostic, not trained)."""

    def __init__(self, mean: tuple[float, ...], sign: float) -> None:
        super().__init__()
        self.register_buffer("shift", sign * torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift.to(x.dtype)


class ResBlock(nn.Module):
    """EDSR residual block: x + res_scale · conv(relu(conv(x)))."""

    def __init__(self, channels: int, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels), nn.ReLU(inplace=True), conv3x3(channels, channels))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


def upsampler(channels: int, scale: int) -> nn.Sequential:
    """EDSR's pixel-shuffle upsampler at constant width: log2(scale) × (conv C→4C, PixelShuffle 2), or for ×3
    conv C→9C, PixelShuffle 3."""
    layers: list[nn.Module] = []
    if scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [conv3x3(channels, 4 * channels), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [conv3x3(channels, 9 * channels), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"upsampling scale must be a power of 2 or 3, got {scale}")
    return nn.Sequential(*layers)


class Head(nn.Sequential):
    def __init__(self, in_channels: int, width: int, mean: tuple[float, ...]) -> None:
        super().__init__(MeanShift(mean, -1.0), conv3x3(in_channels, width))


class Tail(nn.Sequential):
    """The task head: body-end conv, upsampler, reconstruction conv, mean back."""

    def __init__(self, width: int, out_channels: int, scale: int, mean: tuple[float, ...]) -> None:
        super().__init__(
            conv3x3(width, width), upsampler(width, scale), conv3x3(width, out_channels), MeanShift(mean, 1.0)
        )


class SubPixelHead(nn.Sequential):
    """The plainest SR head (ESPCN-style): one 3×3 conv C → out·f², PixelShuffle(f). Its bias starts at the
    image mean, so an untrained head predicts a flat mean image rather than black. The DGL-style SR aux net."""

    def __init__(self, channels: int, out_channels: int, factor: int, mean: tuple[float, ...] | None = None) -> None:
        conv = conv3x3(channels, out_channels * factor * factor)
        with torch.no_grad():
            conv.bias.copy_(torch.tensor(mean or default_mean(out_channels)).repeat_interleave(factor * factor))
        super().__init__(conv, nn.PixelShuffle(factor))


def edsr(
    blocks: int = 16,
    scale: int = 2,
    in_channels: int = 3,
    width: int = 64,
    res_scale: float = 1.0,
    mean: tuple[float, ...] | None = None,
) -> UnitBackbone:
    """Build an EDSR of ``blocks`` residual blocks as units: head, blocks, tail (see the module docstring)."""
    if scale not in UPSCALES:
        raise ValueError(f"EDSR scale must be one of {UPSCALES}, got {scale}")
    if blocks < 1 or width < 1:
        raise ValueError(f"EDSR needs blocks >= 1 and width >= 1, got {blocks} and {width}")
    mean = tuple(mean) if mean is not None else default_mean(in_channels)
    units: list[nn.Module] = [Head(in_channels, width, mean)]
    infos = [UnitInfo("head", width, 0, 1)]
    for j in range(blocks):
        units.append(ResBlock(width, res_scale))
        infos.append(UnitInfo(f"body.{j}", width, 1, 1))
    units.append(Tail(width, in_channels, scale, mean))
    infos.append(UnitInfo("tail", in_channels, 2, 1, is_head=True))
    return UnitBackbone(units, infos, in_channels, num_stages=1)


def _make(blocks: int, res_scale: float):
    def build(**kwargs) -> UnitBackbone:
        kwargs.setdefault("res_scale", res_scale)
        return edsr(blocks, **kwargs)

    build.__doc__ = f"EDSR with {blocks} residual blocks (res_scale {res_scale})."
    return build


for _blocks, _res_scale in ((4, 1.0), (8, 1.0), (16, 1.0), (32, 0.1)):
    register_model(f"edsr{_blocks}")(_make(_blocks, _res_scale))
