"""Activation checkpointing inside a local module (``method.checkpoint``), the baseline users would pick.

A module's units are cut into ``n`` contiguous segments; in training every segment but the last runs under
non-reentrant :func:`torch.utils.checkpoint.checkpoint`, which keeps only the segment's input and recomputes its
forward during backward (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016: √n segments). With
``e2e`` the one module is the whole network (plain checkpointing); with a local method each module is checkpointed
on its own, a combination the local-learning papers do not offer.

Two details make a checkpointed step equal to a plain one:

* BatchNorm updates its running statistics once per step. The recomputation runs in training mode (it must use the
  batch statistics, as the first forward did), so the checkpoint's *recompute context* puts every buffer of the
  segment (running statistics, ``num_batches_tracked``) back as it was before the recomputation. Restoring rather
  than freezing also covers a captured model, whose graph calls the BatchNorm op with its momentum as a constant.
* Dropout and other random ops replay the same masks: the checkpoint restores the RNG state of the first forward
  (``preserve_rng_state``).

The saved-tensor meter does not see what a checkpoint keeps (segment inputs live in the checkpoint's frame, not
in autograd's saved tensors); checkpointed memory is measured at the allocator (``bench memory``'s total peak).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def segment_count(setting: int | str, units: int) -> int:
    """Segments for a module of ``units`` units: ``"sqrt"`` → round(√units), an int n → min(n, units); 0 → 1 (off)."""
    if setting == "sqrt":
        return max(1, round(math.sqrt(units)))
    if not isinstance(setting, int) or setting < 0:
        raise ValueError(f"method.checkpoint must be 0 (off), a segment count >= 1 or 'sqrt', got {setting!r}")
    return max(1, min(setting, units))


class BuffersKept:
    """Buffers as they were, after a recomputation: every buffer of ``module`` (BatchNorm running statistics and
    counts) is copied on entry and written back on exit, so a forward recomputed during backward moves no state
    (the ops still save the same tensors as the first forward, as the checkpoint requires). A fresh instance per
    recomputation: a graph kept for several backwards (a cascade) recomputes more than once."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = list(module.buffers())

    def __enter__(self) -> None:
        self.kept = [b.clone() for b in self.buffers]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for b, value in zip(self.buffers, self.kept):
                b.copy_(value)


@torch.compiler.disable
def recomputed(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, owner: nn.Module | None = None
) -> torch.Tensor:
    """``fn(x)`` under non-reentrant checkpointing with the buffers of ``owner`` (default: ``fn`` itself, a module)
    moved once (:class:`BuffersKept`) and random ops replayed: its activations are rebuilt
    during backward instead of kept. Always eager: dynamo cannot trace a checkpoint with a ``context_fn``, so under
    ``run.compile`` a recomputed piece is a graph break and runs as it does without compile."""
    norms = owner if owner is not None else fn
    assert isinstance(norms, nn.Module), "recomputed needs the module whose BatchNorms fn runs"
    return checkpoint(fn, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), BuffersKept(norms)))


class CheckpointedSequential(nn.Sequential):
    """The units of one local module, forwarded in ``segments`` checkpointed pieces while training with gradients
    (evaluation and ``no_grad`` forwards run plainly). Holds the same unit objects as the backbone, so parameters,
    buffers and state dict keys are the backbone's."""

    def __init__(self, units: list[nn.Module], segments: int) -> None:
        super().__init__(*units)
        n = len(units)
        self.bounds = [round(i * n / segments) for i in range(segments + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or len(self.bounds) <= 2:
            return super().forward(x)
        units = list(self)
        for i, (start, end) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            segment = nn.Sequential(*units[start:end])
            last = i == len(self.bounds) - 2  # the last segment's activations are used right away: keep them
            x = segment(x) if last else recomputed(segment, x)
        return x
