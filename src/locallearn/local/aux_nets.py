"""Auxiliary networks placed on a local module's output (docs/methods.md, "Aux nets and local losses").

All are built from the :class:`UnitInfo` of the module's last unit, so they adapt to any width and resolution,
and they are looked up by name in registries (never ``exec``/``eval``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.units import UnitInfo
from ..names import unknown_name


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU()
    )


INFOPRO_CONFIGS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")
# InfoPro's ImageNet aux pair (its ``Experiments on ImageNet``): this head and the ImageNet decoder.
IMAGENET_AUX = "imagenet"


def _imagenet_head(c: int, widen: int) -> tuple[list[nn.Module], int]:
    """InfoPro's ImageNet head body: 1×1 conv → 128, 3×3 stride-2 → 256, 3×3 stride-2 → 512, 1×1 →
    2048 (each BN, ReLU). The first width is 256 above 512 input channels (HPFF's ImageNet heads on layer3), so
    it fits any stage; widths are times ``widen``. Returns the layers and the output width."""
    first = (128 if c <= 512 else 256) * widen
    widths = [(first, 1, 1), (256 * widen, 3, 2), (512 * widen, 3, 2), (2048 * widen, 1, 1)]
    layers: list[nn.Module] = []
    for width, kernel, stride in widths:
        layers.append(_conv_bn_relu(c, width, kernel, stride))
        c = width
    return layers, c


class InfoProHead(nn.Module):
    """InfoPro's ``AuxClassifier``: ``{n}c{m}f`` = n convs, GAP, m linear layers (blackfeather-wang/InfoPro-Pytorch,
    ``Experiments on CIFAR-SVHN-STL10/networks/auxiliary_nets.py``; ``imagenet``: the ``head`` of its
    ``Experiments on ImageNet/networks/resnet.py``).

    The conv goes to 2C with stride 2 before the last stage and keeps C with stride 1 in it (16→32, 32→64,
    64→64 in the paper's ResNets), times ``widen``. Hidden linear width is ``feature_dim·widen``.
    ``config="imagenet"`` is the ImageNet head instead (:func:`_imagenet_head`, GAP, Linear → ``out_dim``).
    """

    def __init__(
        self, info: UnitInfo, num_stages: int, config: str, out_dim: int, widen: int = 1, feature_dim: int = 128
    ) -> None:
        super().__init__()
        if config not in (*INFOPRO_CONFIGS, IMAGENET_AUX):
            raise ValueError(unknown_name("InfoPro aux config", config, (*INFOPRO_CONFIGS, IMAGENET_AUX)))
        if feature_dim < 1:
            raise ValueError(f"method.feature_dim must be >= 1 (the paper uses 128), got {feature_dim}")
        if config == IMAGENET_AUX:
            layers, c = _imagenet_head(info.channels, widen)
            self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, out_dim))
            return
        convs, fcs = int(config[0]), int(config[2])
        c = info.channels
        layers: list[nn.Module] = []
        if convs:
            last_stage = info.stage >= num_stages
            width, stride = (c if last_stage else 2 * c) * widen, (1 if last_stage else 2)
            layers.append(_conv_bn_relu(c, width, 3, stride))
            if convs == 2:
                layers.append(_conv_bn_relu(width, width, 3, 1))
            c = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        hidden = feature_dim * widen
        for _ in range(fcs - 1):
            layers += [nn.Linear(c, hidden), nn.ReLU()]
            c = hidden
        layers.append(nn.Linear(c, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


DECODERS = ("infopro", IMAGENET_AUX)


class Fp32Sigmoid(nn.Module):
    """The decoder's sigmoid, in fp32 under any autocast: in bf16 a probability near 1 keeps 8 bits, so
    log(1 - p) in the BCE against a bright pixel would be off by up to ~0.7 (the reference trains in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x.float())


class Decoder(nn.Module):
    """InfoPro's reconstruction decoder (``Decoder`` in the same two reference files as :class:`InfoProHead`).
    The image size comes from the batch, so any input size works. Every conv has a bias, as in the reference; on
    the convs followed by BatchNorm it is cancelled in training and moves only that BN's running mean.

    * ``infopro`` (CIFAR/STL): upsample to the image size, 3×3 conv C→12w, BN, ReLU, 3×3 conv → image channels,
      sigmoid.
    * ``imagenet``: progressive. 1×1 conv C→128, then one 3×3 conv per further ×2 upsampling (32 wide, the last
      12), each with BN, ReLU, the last upsampling landing exactly on the image size, and a 3×3 conv → image
      channels, sigmoid. On the reference's 28×28 layer2 map of a 224 image (×8: 3 upsamplings) this is exactly
      its 128 → 56², 32 → 112², 12 → 224², 3 decoder; other split points get as many ×2 steps as their reduction
      needs (×4: 128, 12; ×32: 128, 32, 32, 32, 12), instead of the reference's assertion on 28×28 maps.
      Widths times ``widen``.
    """

    def __init__(self, info: UnitInfo, image_channels: int, widen: int = 1, kind: str = "infopro") -> None:
        super().__init__()
        if kind not in DECODERS:
            raise ValueError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")
        self.kind = kind
        if kind == "infopro":
            self.net = nn.Sequential(
                _conv_bn_relu(info.channels, 12 * widen, 3, bias=True),
                nn.Conv2d(12 * widen, image_channels, 3, padding=1),
                Fp32Sigmoid(),
            )
            return
        steps = max(1, round(math.log2(max(info.reduction, 1))))  # ×2 upsamplings back to the image size
        widths = [w * widen for w in (128, *[32] * max(0, steps - 2), *[12] * (steps >= 2))]
        cins = [info.channels, *widths[:-1]]
        self.stages = nn.ModuleList(
            _conv_bn_relu(cin, width, 1 if i == 0 else 3, bias=True) for i, (cin, width) in enumerate(zip(cins, widths))
        )
        self.out = nn.Sequential(nn.Conv2d(widths[-1], image_channels, 3, padding=1), Fp32Sigmoid())

    def forward(self, h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.kind == "infopro":
            if tuple(h.shape[-2:]) != tuple(size):  # at the image's size already: the identity, not a second copy
                h = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
            return self.net(h)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            target = tuple(size) if i == len(self.stages) - 1 else (2 * h.shape[-2], 2 * h.shape[-1])
            h = F.interpolate(h, size=target, mode="bilinear", align_corners=True)
        return self.out(h)


DGL_HEADS = ("mlp", "mlp-sr", "cnn")


class DGLHead(nn.Module):
    """DGL's ``auxillary_classifier2`` (eugenium/DGL, ``auxiliary_nets_study/models.py``; the ImageNet copy in
    ``imagenet_dgl/models/auxillary_classifier.py`` is the same head without ``cnn``): optional average pool to
    ceil(S/4), ``n_lin`` conv-BN-ReLU layers at the input width, average pool to 2×2, then either an MLP
    (``mlp_layers`` × Linear-BN1d-ReLU at width 4C) or, without an MLP, a BatchNorm2d(C) on the 2×2 map; flatten and
    a linear classifier.

    Variants: ``mlp`` (no convs, 3 MLP layers), ``mlp-sr`` (DGL default: 3 1×1 convs, 3 MLP layers),
    ``cnn`` (2 3×3 convs, no pre-pool, no MLP).
    """

    def __init__(self, info: UnitInfo, kind: str, num_classes: int) -> None:
        super().__init__()
        if kind not in DGL_HEADS:
            raise ValueError(f"unknown DGL head {kind!r}; choose one of {', '.join(DGL_HEADS)}")
        n_lin, mlp_layers, kernel = {"mlp": (0, 3, 1), "mlp-sr": (3, 3, 1), "cnn": (2, 0, 3)}[kind]
        self.prepool = kind != "cnn"
        c = info.channels
        self.convs = nn.Sequential(*[_conv_bn_relu(c, c, kernel) for _ in range(n_lin)])
        self.norm = nn.BatchNorm2d(c) if not mlp_layers else nn.Identity()  # the reference's ``bn``, cnn only
        width = 4 * c
        mlp: list[nn.Module] = []
        for _ in range(mlp_layers):
            mlp += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
        mlp.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.prepool:
            size = -(-h.shape[-1] // 4)
            h = F.adaptive_avg_pool2d(h, (-(-h.shape[-2] // 4), size))
        h = self.norm(F.adaptive_avg_pool2d(self.convs(h), 2))
        return self.mlp(torch.flatten(h, 1))


TOKEN_POOLS = ("auto", "cls", "mean")


class TokenHead(nn.Module):
    """Aux head on a token map (B, N, D), e.g. a ViT block's output (``UnitInfo.tokens``; MAN++'s ViT aux,
    its ``vit_man.py``): LayerNorm, the CLS token (``cls``, token 0) or the mean of all tokens (``mean``), an
    optional hidden Linear + GELU of width ``hidden``, then Linear → ``out_dim``. ``auto`` = ``cls``, except on
    the patch embedding's own output (stage 0), where the CLS token has not yet attended to any patch (a CLS head
    there would train nothing but the CLS and position embeddings), so ``mean``."""

    def __init__(self, info: UnitInfo, out_dim: int, pool: str = "auto", hidden: int | None = None) -> None:
        super().__init__()
        if pool not in TOKEN_POOLS:
            raise ValueError(f"unknown token pooling {pool!r}; choose one of {', '.join(TOKEN_POOLS)}")
        self.pool = ("mean" if info.stage == 0 else "cls") if pool == "auto" else pool
        self.norm = nn.LayerNorm(info.channels, eps=1e-6)
        layers: list[nn.Module] = []
        c = info.channels
        if hidden:
            layers += [nn.Linear(c, hidden), nn.GELU()]
            c = hidden
        layers.append(nn.Linear(c, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3:
            raise ValueError(f"TokenHead expects tokens (B, N, D), got shape {tuple(h.shape)}")
        h = self.norm(h)
        return self.mlp(h[:, 0] if self.pool == "cls" else h.mean(dim=1))
