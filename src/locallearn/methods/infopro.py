"""InfoPro (Wang et al., ICLR 2021; spec methods.md §2).

Module k's local loss is λ1(k)·BCE(decoder(h), image) + λ2(k)·L_y(head(h)), with L_y the supervised contrastive
loss (``loss_mode: contrast``, InfoPro's default) or cross-entropy (``softmax``), and (λ1, λ2) moving linearly
from (ixx_1, ixy_1) at the first module to (ixx_2, ixy_2) at module K-2 (§2.3). The reference steps one optimizer
after all backwards (``step: end``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..local.aux_nets import Decoder, InfoProHead
from ..local.losses import infopro_lambdas, reconstruction_loss, supcon_loss
from ..local.task import Batch
from .base import LocalMethod, MethodCfg, MethodContext, register_method


class InfoProAux(nn.Module):
    def __init__(self, decoder: Decoder, head: InfoProHead) -> None:
        super().__init__()
        self.decoder, self.head = decoder, head


@register_method("infopro")
class InfoPro(LocalMethod):
    default_step = "end"

    def __init__(self, ctx: MethodContext, cfg: MethodCfg) -> None:
        super().__init__(ctx, cfg)
        if len(cfg.lambdas) != 4:
            raise ValueError(f"method.lambdas must be [ixx_1, ixy_1, ixx_2, ixy_2], got {cfg.lambdas}")
        out = cfg.feature_dim if cfg.loss_mode == "contrast" else ctx.task.num_classes
        for info in ctx.module_infos[:-1]:
            head = InfoProHead(info, ctx.num_stages, cfg.aux, out, cfg.widen, cfg.feature_dim)
            self.aux.append(InfoProAux(Decoder(info, ctx.image_channels, cfg.widen), head))
        self.aux.append(None)

    def aux_loss(self, k: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        lam_x, lam_y = infopro_lambdas(k, self.num_modules, *self.cfg.lambdas)
        aux = self.aux[k]
        loss = h.new_zeros((), dtype=torch.float32)
        if lam_x:
            image = batch.image01
            loss = loss + lam_x * reconstruction_loss(aux.decoder(h, image.shape[-2:]), image)
        if lam_y:
            out = aux.head(h)
            if self.cfg.loss_mode == "contrast":
                loss = loss + lam_y * supcon_loss(out, batch.target, self.cfg.temperature)
            else:
                loss = loss + lam_y * self.ctx.task.loss(out, batch)
        return loss

    def aux_logits(self, k: int, h: torch.Tensor) -> torch.Tensor | None:
        if k == self.num_modules - 1 or self.cfg.loss_mode != "softmax":
            return None
        return self.aux[k].head(h)
