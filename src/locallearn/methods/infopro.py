"""InfoPro (Wang et al., ICLR 2021; docs/methods.md, "Base methods").

Module k's local loss is λ1(k)·BCE(decoder(h), image) + λ2(k)·L_y(head(h)), with L_y the supervised contrastive
loss (``loss_mode: contrast``, InfoPro's default) or cross-entropy (``softmax``), and (λ1, λ2) moving linearly
from (ixx_1, ixy_1) at the first module to (ixx_2, ixy_2) at module K-2. The reference steps one optimizer
after all backwards (``step: end``). A term whose λ is 0 is not computed.

On a token map (a ViT block, ``UnitInfo.tokens``) the I(h;y) head is a
:class:`~locallearn.local.aux_nets.TokenHead`: LayerNorm, the CLS token (the token mean on the patch embedding's
own output), a hidden Linear + GELU of ``feature_dim·widen`` when ``aux`` has two or more FC layers, Linear → out;
the convs of ``aux`` do not apply. There is no token
decoder, so λ1 (the reconstruction weight) must be 0 there: set ``method.lambdas`` to ``[0, ixy_1, 0, ixy_2]``
(or use DGL); anything else is a ValueError.

For a language model (``softmax`` only) the two terms read a module's hidden states at every position: the
I(h; x) term reconstructs the input token there, the I(h; y) term predicts the next one, each with a
:class:`~locallearn.tasks.language_model.NextTokenHead` and cross-entropy (docs/methods.md, "Token models"; an
adaptation of ours, as no paper defines InfoPro for text).
"""

from __future__ import annotations

import torch

from ..local.aux_nets import IMAGENET_AUX, INFOPRO_CONFIGS, Decoder, InfoProHead, TokenHead
from ..local.losses import infopro_lambdas, reconstruction_loss, supcon_loss
from ..local.split import PAPER_K_ALIASES
from ..models.units import UnitInfo
from ..names import unknown_name
from ..tasks.language_model import NextTokenHead, token_losses
from ..tasks.task import Batch, ClassificationTask
from .base import LocalMethod, register_method
from .objective import Objective
from .options import MethodCfg, MethodContext
from .pff import PatchDecoders


class InfoProObjective(Objective):
    def __init__(
        self,
        decoder: Decoder | None,
        head: InfoProHead | TokenHead | None,
        lam_x: float,
        lam_y: float,
        cfg: MethodCfg,
        task: ClassificationTask,
    ) -> None:
        super().__init__()
        self.decoder, self.head = decoder, head
        self.lam_x, self.lam_y, self.contrast, self.temperature = (
            lam_x,
            lam_y,
            cfg.loss_mode == "contrast",
            cfg.temperature,
        )
        self.task = task

    def outputs(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor | None, ...]:
        recon = self.decoder(h, batch.image01.shape[-2:]) if self.lam_x else None
        return recon, (self.head(h) if self.lam_y else None)

    def loss_from(self, outputs: tuple[torch.Tensor | None, ...], batch: Batch) -> torch.Tensor:
        recon, out = outputs
        loss = batch.input.new_zeros((), dtype=torch.float32)
        if recon is not None:
            patched = isinstance(self.decoder, PatchDecoders)
            bce = self.decoder.loss(recon, batch.image01) if patched else reconstruction_loss(recon, batch.image01)
            loss = loss + self.lam_x * bce
        if out is not None:
            y_loss = supcon_loss(out, batch.target, self.temperature) if self.contrast else self.task.loss(out, batch)
            loss = loss + self.lam_y * y_loss
        return loss

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return None if self.contrast or self.head is None else self.head(h)


class TokenInfoProObjective(Objective):
    """λ1·CE(the input token) + λ2·CE(the next token) from every position of a language model's hidden states."""

    def __init__(
        self, decoder: NextTokenHead | None, head: NextTokenHead | None, lam_x: float, lam_y: float, task
    ) -> None:
        super().__init__()
        self.decoder, self.head, self.lam_x, self.lam_y, self.task = decoder, head, lam_x, lam_y, task

    def outputs(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor | None, ...]:
        return (self.decoder(h) if self.lam_x else None), (self.head(h) if self.lam_y else None)

    def loss_from(self, outputs: tuple[torch.Tensor | None, ...], batch: Batch) -> torch.Tensor:
        recon, out = outputs
        loss = torch.zeros((), dtype=torch.float32, device=batch.target.device)
        if recon is not None:
            loss = loss + self.lam_x * token_losses(recon, batch.input).mean()
        if out is not None:
            loss = loss + self.lam_y * self.task.loss(out, batch)
        return loss

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return None if self.head is None else self.head(h)


def legacy_stage_ratio(ctx: MethodContext, k: int) -> float:
    """MAN/MAN++ CIFAR's λ ratio (docs/methods.md, "Legacy switches"): r = s'/(K - 2), s' the stage (1..3) of
    the first unit of module k+1 and K the paper's label (MAN's K=16 is 15 modules, so r <= 3/14 and λ barely
    moves)."""
    blocks = sum(info.stage == 1 for info in ctx.unit_infos)
    labels = {m: label for label, m in PAPER_K_ALIASES.get(ctx.split_preset, {}).get(blocks, {}).items()}
    k_label = labels.get(ctx.num_modules, ctx.num_modules)
    return ctx.unit_infos[ctx.ends[k]].stage / (k_label - 2) if k_label > 2 else 0.0


@register_method("infopro")
class InfoPro(LocalMethod):
    default_step = "end"

    def build_objective(self, k: int, info: UnitInfo, independent: bool = False) -> Objective:
        cfg, ctx = self.cfg, self.ctx
        if ctx.task.kind not in ("classification", "language_model"):
            raise ValueError(
                f"infopro's aux nets are class/contrastive heads; for the {ctx.task.kind} task use dgl or glcan"
            )
        if ctx.task.kind == "language_model" and cfg.loss_mode != "softmax":
            raise ValueError("infopro on a language model predicts tokens with softmax: set method.loss_mode=softmax")
        if len(cfg.lambdas) != 4:
            raise ValueError(f"method.lambdas must be [ixx_1, ixy_1, ixx_2, ixy_2], got {cfg.lambdas}")
        ratio = legacy_stage_ratio(ctx, k) if "stage_lambda" in cfg.legacy else None
        lam_x, lam_y = infopro_lambdas(k, ctx.num_modules, *cfg.lambdas, ratio=ratio)
        if independent:  # beside a cascade: HPFF's independent aux net is the head alone (HPFF's code)
            lam_x, lam_y = 0.0, 1.0
        elif lam_x == lam_y == 0 and self.span == 1:  # no other loss reaches module k: it would never train
            raise ValueError(
                f"method.lambdas={list(cfg.lambdas)} gives local module {k} of {ctx.num_modules} the weights (0, 0), "
                "so it would never train (λ reach (ixx_2, ixy_2) at module K-2): give ixx_2 or ixy_2 a value > 0, "
                "or add method.legacy=[stage_lambda] for MAN's stage ratio"
            )
        if ctx.task.kind == "language_model":
            vocab = ctx.task.vocab_size
            decoder = self.init_aux(NextTokenHead(info.channels, vocab)) if lam_x else None
            head = self.init_aux(NextTokenHead(info.channels, vocab)) if lam_y else None
            return TokenInfoProObjective(decoder, head, lam_x, lam_y, ctx.task)
        out = cfg.feature_dim if cfg.loss_mode == "contrast" else ctx.task.num_classes
        if info.tokens:
            if lam_x:
                raise ValueError(
                    f"InfoPro has no decoder for the token map {info.name!r} (lambda ixx={lam_x:g} > 0): set "
                    "method.lambdas=[0, ixy_1, 0, ixy_2] or use method.name=dgl"
                )
            if cfg.aux not in INFOPRO_CONFIGS:
                raise ValueError(unknown_name("InfoPro aux config", cfg.aux, INFOPRO_CONFIGS))
            hidden = cfg.feature_dim * cfg.widen if int(cfg.aux[2]) >= 2 else None
            head = self.init_aux(TokenHead(info, out, pool="auto", hidden=hidden)) if lam_y else None
            return InfoProObjective(None, head, lam_x, lam_y, cfg, ctx.task)
        head = InfoProHead(info, ctx.num_stages, cfg.aux, out, cfg.widen, cfg.feature_dim) if lam_y else None
        kind = "imagenet" if cfg.aux == IMAGENET_AUX else "infopro"  # aux: imagenet = InfoPro's ImageNet head + decoder
        decoder = Decoder(info, ctx.image_channels, cfg.widen, kind) if lam_x else None
        if decoder is not None and "pff" in cfg.addons and cfg.pff_mode == "decoder":
            decoder = PatchDecoders(lambda: Decoder(info, ctx.image_channels, cfg.widen, kind), cfg.pff_patches)
        for part in (head, decoder):  # as InfoProResNet's init loop, which runs over its aux nets too
            if part is not None:
                self.init_aux(part)
        return InfoProObjective(decoder, head, lam_x, lam_y, cfg, ctx.task)
