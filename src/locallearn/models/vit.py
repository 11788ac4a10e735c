"""Vision Transformer (Dosovitskiy et al., 2021) as ordered units (MAN++'s ViT; docs/methods.md).

Units: patch embedding (+ CLS token + learned position embedding), one unit per pre-norm transformer block, head
(final LayerNorm, CLS token, Linear). Token units output (B, N+1, D) and carry ``UnitInfo(tokens=True)`` with
``channels = D``, ``stage = 1`` and ``reduction = patch size``, so aux builders put token heads on them.

Registered as ``vit_tiny`` / ``vit_small`` / ``vit_base`` (D = 192 / 384 / 768; 3 / 6 / 12 heads; 12 blocks;
patch 16, image 224, MLP ratio 4, qkv bias, no dropout or drop-path, as in MAN++'s ``vit_man.py``). ``width``
(the embedding dim; the training loop always passes ``model.width``, so presets must set it), ``heads`` (default
``width // 64``, at least 1), ``depth``, ``patch_size`` and ``image_size`` are configurable. An input whose patch
grid differs from ``image_size``'s gets the position embedding bilinearly resized.

MAN++'s K=4 split (4 groups of 3 blocks, the patch embedding in group 1, the head in group 4) is
``split.preset: auto`` with ``split.balance: params`` (or ``split.preset: ends`` with ``split.ends: [4, 7, 10, 14]``);
``balance: units`` gives [3, 6, 10, 14] (3, 3, 4, 4 units) instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .units import UnitBackbone, UnitInfo


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches → Linear (the same function as a p×p stride-p conv, done as a reshape and a
    matmul so it does not depend on oneDNN's strided conv on CPU), then CLS token and position embedding."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, image_size: int) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"model image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))

    def _pos(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid_pos.shape[-1]
        grid_pos = grid_pos.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bilinear", align_corners=False)
        return torch.cat([cls_pos, grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"ViT input {h}×{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        tokens = self.proj(patches)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return tokens + self._pos(gh, gw)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with MLP = Linear, GELU, Linear."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x)[:, 0])


def _init_weights(model: nn.Module) -> None:
    """timm-style: Linear weights trunc-normal(0.02), biases 0; LayerNorm γ=1, β=0; position embedding
    trunc-normal(0.02); CLS token normal(1e-6)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.trunc_normal_(m.pos_embed, std=0.02)
            nn.init.normal_(m.cls_token, std=1e-6)
    for m in model.modules():  # the patch projection keeps the conv-style default (fan-in uniform), as timm
        if isinstance(m, PatchEmbed):
            m.proj.reset_parameters()


def vit(
    num_classes: int = 1000,
    in_channels: int = 3,
    width: int = 384,
    depth: int = 12,
    heads: int | None = None,
    patch_size: int = 16,
    image_size: int = 224,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
) -> UnitBackbone:
    """Build a ViT as ordered units: patch embed, ``depth`` blocks, head."""
    heads = max(1, width // 64) if heads is None else heads
    if width < 1 or depth < 1 or heads < 1 or width % heads:
        raise ValueError(
            f"ViT needs width, depth, heads >= 1 and width divisible by heads; got {width}/{depth}/{heads}"
        )
    units: list[nn.Module] = [PatchEmbed(in_channels, width, patch_size, image_size)]
    infos = [UnitInfo("patch_embed", width, 0, patch_size, tokens=True)]
    for j in range(depth):
        units.append(Block(width, heads, mlp_ratio, qkv_bias))
        infos.append(UnitInfo(f"blocks.{j}", width, 1, patch_size, tokens=True))
    units.append(ViTHead(width, num_classes))
    infos.append(UnitInfo("head", num_classes, 2, patch_size, is_head=True))
    model = UnitBackbone(units, infos, in_channels, num_stages=1)
    _init_weights(model)
    model.weight_init = _init_weights  # MAN++'s ViT applies it to its aux heads and bridge copies too
    return model


_VARIANTS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}


def _make(name: str, width: int):
    def build(**kwargs) -> UnitBackbone:
        kwargs.setdefault("width", width)
        return vit(**kwargs)

    build.__doc__ = f"{name}: ViT with embedding dim {width}, {width // 64} heads, 12 blocks, patch 16 (MAN++'s ViT)."
    return build


for _name, _width in _VARIANTS.items():
    register_model(_name)(_make(_name, _width))
