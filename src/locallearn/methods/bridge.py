"""Momentum bridges: copies of later backbone units in front of an aux objective (MAN, MAN++, LAM).

MAN (docs/methods.md, "Add-ons"): module i's aux net starts with two copies of the first unit of module i+1: a
learnable one (LB, trained by the local loss) and an EMA one (never trained by gradient; after the local backward
θ_EMA ← m·θ_EMA + (1−m)·θ_live, with ``lerp_`` under ``no_grad``; with ``ema_warmup`` m is min(m, (1+t)/(10+t)) at
the t-th update). Combined as LB(h) + EMA(h) (MAN) or
s·LB(h) + (2−s)·EMA(h) with a learnable s starting at 1 (MAN++).

LAM (MLAAN): the same bridge over a *leap chain* of later units, ending at the final width; the first
``n_ema`` sources get EMA twins, and every module's EMA is updated (the reference updates only the last one).

The chain rule (``leap_chain``): from a split at unit u, take the first unit of every later stage (those change
the width), then fill up to ``lam_depth`` units with evenly spaced units of the final stage, ending with its last
unit. It matches 11 of the reference's 14 ResNet-32 chains; deeper nets get longer chains than the reference's
hand tables (docs/reproduce.md).

EMA copies hold ``requires_grad=False`` parameters: the engine leaves them out of every optimizer (so they are never
decayed), and they are saved and restored with the method's state dict.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..local.checkpointing import recomputed
from ..models.units import UnitInfo, main_tensor
from ..tasks.task import Batch
from .objective import Objective, ObjectiveBuilder
from .pff import PatchFusion


def next_unit(method: ObjectiveBuilder, k: int) -> list[int]:
    """MAN's sources: the first ``man_depth`` units of module k+1 (1 for CNNs; MAN++ ViT copies 2 blocks), never
    the task head."""
    if method.cfg.man_depth < 1:
        raise ValueError(f"method.man_depth must be >= 1, got {method.cfg.man_depth}")
    first = method.ctx.ends[k]
    units = range(first, min(first + method.cfg.man_depth, method.ctx.ends[k + 1]))
    return [i for i in units if not method.ctx.unit_infos[i].is_head]


def leap_chain(method: ObjectiveBuilder, k: int) -> list[int]:
    """LAM's sources for the split after module k: every later unit that changes the stage (they change the
    width and resolution, so the chain stays well-formed), then units of the final stage spread evenly up to
    ``lam_depth`` in all, always ending with the last body unit. ResNet-32, split in stage 1 → L2.0, L3.0, L3.2,
    L3.4; in stage 2 → L3.0, L3.2, L3.3, L3.4 (MLAAN's table; docs/methods.md, "Add-ons")."""
    infos, depth = method.ctx.unit_infos, method.cfg.lam_depth
    last_body = max(i for i, info in enumerate(infos) if not info.is_head)
    later = list(range(method.ctx.ends[k], last_body + 1))
    if not later:
        return []
    firsts = [i for i in later if i > 0 and infos[i].stage != infos[i - 1].stage]
    pool = [i for i in later if infos[i].stage == infos[last_body].stage and i not in firsts]
    room = max(depth - len(firsts), 0)
    picks = pool if room >= len(pool) else [pool[-(-(j + 1) * len(pool) // room) - 1] for j in range(room)]
    return sorted(set(firsts + picks))


class MomentumBridge(nn.Module):
    """Learnable copies of ``sources`` chained in order; the first ``n_ema`` also get an EMA twin. Follows MAN's
    ``resnetInfoPro_MAN.py`` (``LB``/``EMA_Net``), MAN++'s ``resnetInfoPro_MANPP.py`` and ``vit_man.py``, and MLAAN's
    ``resnetMLAAN.py`` (``Aug_Net``/``EMA_Net``); the chains differ from MLAAN's hand tables (docs/reproduce.md)."""

    def __init__(self, method: ObjectiveBuilder, sources: list[int]) -> None:
        super().__init__()
        cfg, units, infos = method.cfg, method.ctx.units, method.ctx.unit_infos
        if not 0 <= cfg.ema_decay < 1:
            raise ValueError(f"method.ema_decay must be in [0, 1) (1.0 never moves the EMA), got {cfg.ema_decay}")
        self.sources, self.decay, self.combine = list(sources), cfg.ema_decay, cfg.bridge_combine
        self.live = [units[i] for i in sources]  # plain list: the backbone owns these, not the bridge
        self.learnable = nn.ModuleList(copy.deepcopy(units[i]) for i in sources)
        self.ema = nn.ModuleList(copy.deepcopy(units[i]) for i in sources[: cfg.n_ema if self.combine != "none" else 0])
        if cfg.ema_init == "random":  # the MAN and MLAAN code re-initialise their copies by the network's init loop
            for module in [*self.learnable, *self.ema]:
                for sub in module.modules():
                    if hasattr(sub, "reset_parameters"):
                        sub.reset_parameters()
                method.init_aux(module)
        for p in self.ema.parameters():
            p.requires_grad_(False)
        if cfg.ema_warmup:  # a buffer: saved, restored and moved with the method, read without a host sync
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(())) if self.combine == "scaled" else None
        self.out_info: UnitInfo = infos[sources[-1]]

    def forward(self, h: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """The chain; with ``recompute`` each link (a learnable copy with its EMA twin) is checkpointed on its own,
        so its backward rebuilds one link's activations at a time (MLAAN's chains are 4 blocks long)."""
        for j in range(len(self.learnable)):
            if recompute:
                h = recomputed(lambda x, j=j: self.link(j, x), h, owner=self.link_modules(j))
            else:
                h = self.link(j, h)
        return h

    def link(self, j: int, h: Any) -> Any:
        """Copy j on ``h`` (a tensor, or a captured model's carry: every floating tensor of it is combined)."""
        y = self.learnable[j](h)
        if j >= len(self.ema):
            return y
        e = self.ema[j](h)

        def mix(a: Any, b: Any) -> Any:
            if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
                return a
            return a + b if self.scale is None else self.scale * a + (2 - self.scale) * b

        return tuple(mix(a, b) for a, b in zip(y, e)) if isinstance(y, tuple) else mix(y, e)

    def link_modules(self, j: int) -> nn.Module:
        return nn.ModuleList([self.learnable[j], *([self.ema[j]] if j < len(self.ema) else [])])

    def ema_weight(self) -> float | torch.Tensor:
        """1 − m of the next update: a float, or with ``ema_warmup`` a 0-d tensor 1 − min(m, (1+t)/(10+t)) on the
        bridge's device (no host sync per step)."""
        t = getattr(self, "ema_updates", None)
        if t is None:
            return 1 - self.decay
        return 1 - torch.clamp((1 + t) / (10 + t), max=self.decay)

    @torch.no_grad()
    def update_ema(self, under_autograd: bool = False) -> None:
        """θ_EMA ← m·θ_EMA + (1−m)·θ_live for every EMA twin (parameters; BN buffers are not averaged).
        ``under_autograd``: the EMA weights are still saved for a pending backward (``legacy:
        [ema_before_backward]``); update their ``.data`` so that backward runs with the moved weights, as the
        MAN++ ViT reference does, instead of failing autograd's version check."""
        if not len(self.ema):
            return
        weight = self.ema_weight()
        pairs = [
            (e, p)
            for ema, live in zip(self.ema, self.live)
            for e, p in zip(ema.parameters(), live.parameters(), strict=True)
        ]
        targets = [e.data if under_autograd else e for e, _ in pairs]
        sources = [p.detach().to(e.dtype) for e, p in pairs]
        if isinstance(weight, float):  # one fused multi-tensor update (bitwise the same as lerp_ per tensor)
            torch._foreach_lerp_(targets, sources, weight)
        else:  # the warm-up's 0-d tensor weight: per tensor, since the fused form reads it on the host
            for target, source in zip(targets, sources):
                target.lerp_(source, weight.to(target.dtype))
        if isinstance(weight, torch.Tensor):
            self.ema_updates += 1


class Bridged(Objective):
    """An objective whose input first passes through a :class:`MomentumBridge`.

    ``recompute``: in training each link of the bridge's chain of copied blocks runs under its own non-reentrant
    checkpoint (:mod:`locallearn.local.checkpointing`, BatchNorm statistics moved once), so the aux backward rebuilds
    the links one at a time instead of keeping them all from the forward: a chain then costs its links' inputs and
    one link's activations, not every link's (MLAAN's 4-block leap chains at the split's resolution cost more than
    E2E itself otherwise). A one-link bridge (MAN) gains little: its link is rebuilt whole. Same losses and
    gradients, bitwise on CPU."""

    takes_carry = True  # the bridge's copies of the next units read the whole carry of a captured model

    def __init__(self, bridge: MomentumBridge, objective: Objective, recompute: bool = False) -> None:
        super().__init__()
        self.bridge, self.objective, self.recompute = bridge, objective, recompute

    def outputs(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor | None, ...]:
        recompute = self.recompute and self.training and torch.is_grad_enabled()
        return self.objective.outputs(main_tensor(self.bridge(h, recompute)), batch)

    def loss_from(self, outputs: tuple[torch.Tensor | None, ...], batch: Batch) -> torch.Tensor:
        return self.objective.loss_from(outputs, batch)

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        return self.objective.logits(main_tensor(self.bridge(h)))

    def update_ema(self, under_autograd: bool = False) -> None:
        self.bridge.update_ema(under_autograd)


def build_bridged(method: ObjectiveBuilder, k: int, info: UnitInfo, main: bool = True) -> Objective:
    """Module k's objective with the configured add-ons: [bridge →] [patch fusion →] base objective.
    ``main=False`` builds the light independent objective beside a cascade (no bridge, no decoder: HiLo/MLM)."""
    cfg = method.cfg
    sources: list[int] = []
    if main and "man" in cfg.addons:
        sources = next_unit(method, k)
    elif main and "lam" in cfg.addons:
        sources = leap_chain(method, k)
    prefix = MomentumBridge(method, sources) if sources else None
    objective = method.build_objective(k, prefix.out_info if prefix else info, independent=not main)
    if "pff" in cfg.addons and cfg.pff_mode == "paper":
        if info.tokens or method.ctx.task.kind == "language_model":
            raise ValueError(
                f"patch fusion (pff, HPFF) cuts a (B, C, H, W) map into spatial patches, and module {k} outputs "
                "tokens; drop pff from method.addons (MAN and MLAAN work on tokens)"
            )
        objective = PatchFusion(objective, cfg.pff_patches, cfg.pff_sequential)
    # ema_before_backward moves the EMA weights between forward and backward: a recomputation would see them moved.
    recompute = cfg.aux_recompute and "ema_before_backward" not in cfg.legacy
    return Bridged(prefix, objective, recompute) if prefix else objective
