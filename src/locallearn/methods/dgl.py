"""DGL, decoupled greedy learning (Belilovsky et al., ICML 2020; docs/methods.md, "Base methods").

Each module gets a DGL aux classifier (``mlp-sr`` by default) trained with cross-entropy, and its optimizer
steps right after its own backward (``step: module``). On a token map (a ViT block, ``UnitInfo.tokens``) the aux
net is a :class:`~locallearn.local.aux_nets.TokenHead` whatever ``dgl_head`` says: LayerNorm, the CLS token (the
token mean on the patch embedding's own output), Linear (MAN++'s ViT aux head; docs/methods.md, "Aux nets and
local losses").

For any other task (super-resolution) the aux net is the task's ``plain_head`` (SR: one conv + pixel shuffle to
the HR image): the "DGL-style" baseline of GLCAN's comparisons, a task head per module without GLCAN's design.
"""

from __future__ import annotations

import torch

from ..local.aux_nets import DGLHead, TokenHead
from ..models.units import UnitInfo
from ..tasks.task import Batch
from .base import LocalMethod, register_method
from .objective import Objective


class DGLObjective(Objective):
    def __init__(self, head: DGLHead | TokenHead, task) -> None:
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
        if self.ctx.task.kind != "classification":  # other tasks: the task's plain head (docs/glcan.md)
            return DGLObjective(self.init_aux(self.ctx.task.plain_head(info, self.ctx.image_channels)), self.ctx.task)
        num_classes = self.ctx.task.num_classes
        if info.tokens:
            return DGLObjective(self.init_aux(TokenHead(info, num_classes, pool="auto")), self.ctx.task)
        return DGLObjective(self.init_aux(DGLHead(info, self.cfg.dgl_head, num_classes)), self.ctx.task)
