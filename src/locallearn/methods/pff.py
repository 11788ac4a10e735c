"""Patch feature fusion (HPFF's PFF, Su et al., ECCV 2024; docs/methods.md, "Add-ons").

The aux input is cut into n×n patches (``torch.tensor_split``, so odd sizes give patches that differ by one
row/column: an 8×8 map with n=3 gives 3/3/2) and the wrapped objective runs on each patch. Vector outputs
(logits, projections) are averaged before the loss: ŷ = (1/n²)·Σ g(patch), the paper's form. Spatial outputs
(a decoder's reconstruction) are stitched: the decoder of patch (i, j) reconstructs the matching patch of the image,
as HPFF's CIFAR code does, so the decoder costs what it costs without patches instead of n² times more; the BCE on
the stitched image is the mean of the per-patch BCEs (the reference sums them: a constant factor n²). With
``sequential=True`` each patch runs under activation checkpointing, so only one patch's aux activations are
alive at a time during backward (same loss and gradients; BN layers in the aux net see each patch twice).

``pff_mode: decoder`` is the CIFAR code's variant instead (:class:`PatchDecoders`): one decoder per patch, summed
BCEs, head unpatched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..local.losses import reconstruction_loss
from ..tasks.task import Batch
from .objective import Objective


def patches(h: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The n×n spatial patches of a (B, C, H, W) map, row-major; needs H, W >= n."""
    if h.dim() != 4 or min(h.shape[-2:]) < n:
        raise ValueError(f"patch fusion with n={n} needs a (B, C, H, W) map at least {n}×{n}, got {tuple(h.shape)}")
    return [p for rows in torch.tensor_split(h, n, dim=-2) for p in torch.tensor_split(rows, n, dim=-1)]


def stitch(parts: list[torch.Tensor] | tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """Inverse of :func:`patches`: the row-major n×n patches back into one map."""
    return torch.cat([torch.cat(parts[r * n : (r + 1) * n], dim=-1) for r in range(n)], dim=-2)


class PatchDecoders(nn.Module):
    """``pff_mode: decoder``, HPFF's CIFAR code (its ``Decoder``): the feature map is cut into n×n patches and each
    goes through *its own* decoder, which reconstructs the matching patch of the image; the loss is the **sum** of
    the per-patch BCEs (the reference's 4 quadrant BCEs). The classifier/projection head is not patched."""

    def __init__(self, make_decoder: Callable[[], nn.Module], n: int) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"method.pff_patches must be >= 1, got {n}")
        self.n = n
        self.decoders = nn.ModuleList(make_decoder() for _ in range(n * n))

    def forward(self, h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        rows = [len(r) for r in torch.tensor_split(torch.arange(size[0]), self.n)]
        cols = [len(c) for c in torch.tensor_split(torch.arange(size[1]), self.n)]
        sizes = [(r, c) for r in rows for c in cols]
        return stitch([dec(p, s) for dec, p, s in zip(self.decoders, patches(h, self.n), sizes)], self.n)

    def loss(self, recon: torch.Tensor, image01: torch.Tensor) -> torch.Tensor:
        return sum(reconstruction_loss(r, t) for r, t in zip(patches(recon, self.n), patches(image01, self.n)))


class PatchFusion(Objective):
    def __init__(self, objective: Objective, n: int = 2, sequential: bool = False) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"method.pff_patches must be >= 1, got {n}")
        self.objective, self.n, self.sequential = objective, n, sequential

    def outputs(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor | None, ...]:
        n = self.n
        image_patches = patches(batch.raw, n) if batch.raw is not None else [None] * n * n
        results = []
        for patch, raw in zip(patches(h, n), image_patches):
            sub = Batch(batch.input, batch.target, raw)  # image01 of the sub-batch is this patch of the image
            if self.sequential and torch.is_grad_enabled():
                results.append(checkpoint(self.objective.outputs, patch, sub, use_reentrant=False))
            else:
                results.append(self.objective.outputs(patch, sub))
        fused: list[torch.Tensor | None] = []
        for parts in zip(*results):
            if parts[0] is None:
                fused.append(None)
            elif parts[0].dim() == 4:  # spatial: stitch the n×n patches back into one map
                fused.append(stitch(parts, n))
            else:
                fused.append(torch.stack(parts).mean(0))
        return tuple(fused)

    def loss_from(self, outputs: tuple[torch.Tensor | None, ...], batch: Batch) -> torch.Tensor:
        return self.objective.loss_from(outputs, batch)

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        logits = [self.objective.logits(p) for p in patches(h, self.n)]
        return None if logits[0] is None else torch.stack(logits).mean(0)
