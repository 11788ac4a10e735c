"""DGL, decoupled greedy learning (Belilovsky et al., ICML 2020; spec methods.md §1).

Each module gets a DGL aux classifier (``mlp-sr`` by default) trained with cross-entropy, and its optimizer
steps right after its own backward (``step: module``).
"""

from __future__ import annotations

import torch

from ..local.aux_nets import DGLHead
from ..local.task import Batch
from .base import LocalMethod, MethodCfg, MethodContext, register_method


@register_method("dgl")
class DGL(LocalMethod):
    default_step = "module"

    def __init__(self, ctx: MethodContext, cfg: MethodCfg) -> None:
        super().__init__(ctx, cfg)
        n = ctx.task.num_classes
        for info in ctx.module_infos[:-1]:
            self.aux.append(DGLHead(info, cfg.dgl_head, n))
        self.aux.append(None)

    def aux_loss(self, k: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.ctx.task.loss(self.aux[k](h), batch)

    def aux_logits(self, k: int, h: torch.Tensor) -> torch.Tensor | None:
        return self.aux[k](h) if k < self.num_modules - 1 else None
