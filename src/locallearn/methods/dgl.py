"""DGL, decoupled greedy learning (Belilovsky et al., ICML 2020; spec methods.md §1).

Each module gets a DGL aux classifier (``mlp-sr`` by default) trained with cross-entropy, and its optimizer
steps right after its own backward (``step: module``).
"""

from __future__ import annotations

import torch

from ..local.aux_nets import DGLHead
from ..local.task import Batch
from ..models.units import UnitInfo
from .base import LocalMethod, Objective, register_method


class DGLObjective(Objective):
    def __init__(self, head: DGLHead, task) -> None:
        super().__init__()
        self.head, self.task = head, task

    def outputs(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor | None, ...]:
        return (self.head(h),)

    def loss_from(self, outputs: tuple[torch.Tensor | None, ...], batch: Batch) -> torch.Tensor:
        return self.task.loss(outputs[0], batch)

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return self.head(h)


@register_method("dgl")
class DGL(LocalMethod):
    default_step = "module"

    def build_objective(self, k: int, info: UnitInfo, independent: bool = False) -> Objective:
        return DGLObjective(DGLHead(info, self.cfg.dgl_head, self.ctx.task.num_classes), self.ctx.task)
