"""Auxiliary networks placed on a local module's output (spec methods.md §1.2, §2.2).

All are built from the :class:`UnitInfo` of the module's last unit, so they adapt to any width and resolution,
and they are looked up by name in registries (never ``exec``/``eval``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.units import UnitInfo


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


INFOPRO_CONFIGS = ("0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f")


class InfoProHead(nn.Module):
    """InfoPro's ``AuxClassifier``: ``{n}c{m}f`` = n convs, GAP, m linear layers (spec §2.2 table).

    The conv goes to 2C with stride 2 before the last stage and keeps C with stride 1 in it (16→32, 32→64,
    64→64 in the paper's ResNets), times ``widen``. Hidden linear width is ``feature_dim·widen``.
    """

    def __init__(
        self, info: UnitInfo, num_stages: int, config: str, out_dim: int, widen: int = 1, feature_dim: int = 128
    ) -> None:
        super().__init__()
        if config not in INFOPRO_CONFIGS:
            raise ValueError(f"unknown InfoPro aux config {config!r}; choose one of {', '.join(INFOPRO_CONFIGS)}")
        if feature_dim < 1:
            raise ValueError(f"method.feature_dim must be >= 1 (the paper uses 128), got {feature_dim}")
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


class Decoder(nn.Module):
    """InfoPro's reconstruction decoder: upsample to the image size, 3×3 conv C→12w, BN, ReLU, 3×3 conv →
    image channels, sigmoid (spec §2.2). The image size comes from the batch, so any input size works."""

    def __init__(self, info: UnitInfo, image_channels: int, widen: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            _conv_bn_relu(info.channels, 12 * widen, 3),
            nn.Conv2d(12 * widen, image_channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.net(F.interpolate(h, size=size, mode="bilinear", align_corners=True))


DGL_HEADS = ("mlp", "mlp-sr", "cnn")


class DGLHead(nn.Module):
    """DGL's ``auxillary_classifier2`` (spec §1.2): optional pool to ceil(S/4), ``n_lin`` conv-BN-ReLU layers,
    pool to 2×2, then an MLP (``mlp_layers`` × Linear-BN-ReLU) or BN, and a linear classifier.

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
        width = 4 * c
        mlp: list[nn.Module] = []
        for _ in range(mlp_layers):
            mlp += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
        if not mlp_layers:
            mlp.append(nn.BatchNorm1d(width))
        mlp.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.prepool:
            size = -(-h.shape[-1] // 4)
            h = F.adaptive_avg_pool2d(h, (-(-h.shape[-2] // 4), size))
        h = F.adaptive_avg_pool2d(self.convs(h), 2)
        return self.mlp(torch.flatten(h, 1))


TOKEN_POOLS = ("auto", "cls", "mean")


class TokenHead(nn.Module):
    """Aux head on a token map (B, N, D), e.g. a ViT block's output (``UnitInfo.tokens``; MAN++ ViT aux, spec
    §3.2): LayerNorm, the CLS token (``cls``, token 0) or the mean of all tokens (``mean``), an optional hidden
    Linear + GELU of width ``hidden``, then Linear → ``out_dim``. ``auto`` = ``cls``, except on the patch
    embedding's own output (stage 0), where the CLS token has not yet attended to any patch (a CLS head there
    would train nothing but the CLS and position embeddings), so ``mean``."""

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
