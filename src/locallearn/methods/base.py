"""The method contract (design rule: a method only builds aux nets and returns local losses).

A method is an ``nn.Module`` holding one *objective* (aux net + loss) per local module. The engine calls
:meth:`LocalMethod.local_losses` on each module's output and alone calls ``backward``/``step``, so the
single-process engine and the pipeline runtime run the very same method objects.

Add-ons compose with any base (docs/methods.md, "Add-ons"): a base method (``dgl``, ``infopro``) only says how to
build the objective for a feature map described by a :class:`UnitInfo`; ``method.addons`` then wraps it:

* ``man`` — momentum bridge (MAN, MAN++ with ``bridge_combine: scaled``): learnable + EMA copies of the next
  module's first unit in front of the objective (:mod:`.bridge`);
* ``lam`` — leap augmented modules (MLAAN): the same bridge over a leap chain of later units (:mod:`.bridge`);
* ``pff`` — patch feature fusion (HPFF): the objective runs on n×n patches, outputs averaged (:mod:`.pff`);
* ``cascade`` — HiLo / MLM: a second objective whose loss reaches the ``cascade_span`` modules ending here
  (HPFF's HiLo, MLAAN's MLM); the engine routes each loss's gradient by its ``reach``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from ..models.units import UnitInfo, main_tensor
from ..names import unknown_name
from ..tasks.task import Batch
from .bridge import build_bridged
from .objective import LocalLoss, ModuleAux, Objective
from .options import ADDONS, LEGACY, MethodCfg, MethodContext
from .pff import PatchDecoders

AuxNet = TypeVar("AuxNet", bound=nn.Module)


class LocalMethod(nn.Module):
    """Base class: builds one :class:`ModuleAux` per module (with add-ons) and returns local losses.

    Subclasses implement :meth:`build_objective` (the base aux net at a feature map); the last module's
    loss is the task loss.
    """

    default_k: int = 4
    default_step: str = "module"

    def __init__(self, ctx: MethodContext, cfg: MethodCfg) -> None:
        super().__init__()
        self.ctx, self.cfg = ctx, cfg
        unknown = [a for a in cfg.addons if a not in ADDONS]
        if unknown:
            raise ValueError(unknown_name("add-on", unknown[0], ADDONS, " in method.addons"))
        if "man" in cfg.addons and "lam" in cfg.addons:
            raise ValueError("method.addons: 'man' and 'lam' both prefix the aux net with copies; pick one")
        if cfg.cascade_span < 1:
            raise ValueError(f"method.cascade_span must be >= 1, got {cfg.cascade_span}")
        bad = [name for name in cfg.legacy if name not in LEGACY]
        if bad:
            raise ValueError(unknown_name("method.legacy switch", bad[0], LEGACY))
        self.span = cfg.cascade_span if "cascade" in cfg.addons else 1
        self.final_mode = "cascade" if "final_overwrite" in cfg.legacy else cfg.cascade_final
        if "triple_bn" in cfg.legacy:
            reference_bn_updates(ctx, self.span)
        self.aux = nn.ModuleList()
        for k, info in enumerate(ctx.module_infos[:-1]):
            # With a cascade, the bridge (MAN/LAM) goes on the cascade path, the independent head stays plain
            # (HiLo's IAN, MLAAN's independent classifier).
            independent = build_bridged(self, k, info, main=self.span == 1)
            cascade = build_bridged(self, k, info) if self.span > 1 else None
            self.aux.append(ModuleAux(independent, cascade))
        self.aux.append(None)
        patched = any(isinstance(m, PatchDecoders) for m in self.modules())
        if "pff" in cfg.addons and cfg.pff_mode == "decoder" and ctx.num_modules > 1 and not patched:
            raise ValueError(
                "method.pff_mode=decoder patches InfoPro's reconstruction decoder and no aux net has one "
                "(DGL, or lambda ixx = 0 everywhere): use method.pff_mode=paper"
            )

    @property
    def num_modules(self) -> int:
        return self.ctx.num_modules

    @property
    def max_reach(self) -> int:
        """The longest reach of any loss: the engine keeps that many module graphs alive."""
        return self.span

    def build_objective(self, k: int, info: UnitInfo, independent: bool = False) -> Objective:
        """The base aux net + loss for module k, on a feature map described by ``info``. ``independent``: the
        light independent head that sits beside a cascade (HiLo's IAN, MLAAN's classifier: no decoder)."""
        raise NotImplementedError

    def init_aux(self, module: AuxNet) -> AuxNet:
        """``module`` (a freshly built aux net) initialised as the backbone initialises its own layers: the
        reference code builds its aux nets inside the network, so the network's init loop reaches them too
        (InfoPro's ``InfoProResNet``, DGL's ImageNet ``ResNet``; docs/methods.md, "Aux-net initialisation").
        ``method.aux_init: torch`` keeps torch's defaults instead."""
        if self.ctx.weight_init is not None and self.cfg.aux_init == "backbone":
            self.ctx.weight_init(module)
        return module

    def local_losses(self, k: int, h: torch.Tensor | tuple, batch: Batch) -> list[LocalLoss]:
        """The losses module k's output contributes, each with its reach. ``h``: the module's output, a tensor or
        a captured model's carry (main tensor first; the last module's output is always the prediction)."""
        last = k == self.num_modules - 1
        if last:
            task_loss = self.ctx.task.loss(h, batch)
            if self.span == 1 or self.final_mode == "plain":
                return [LocalLoss(task_loss)]
            if self.final_mode == "cascade":
                return [LocalLoss(task_loss, self.span)]
            return [LocalLoss(self.cfg.w_ind * task_loss), LocalLoss(self.cfg.w_casc * task_loss, self.span)]
        aux = self.aux[k]
        independent = aux.independent.loss(aux.independent.input_of(h), batch)
        if aux.cascade is None:
            losses = [LocalLoss(independent)]
        else:
            losses = [
                LocalLoss(self.cfg.w_ind * independent),
                LocalLoss(self.cfg.w_casc * aux.cascade.loss(aux.cascade.input_of(h), batch), self.span),
            ]
        if "ema_before_backward" in self.cfg.legacy:  # MAN++ ViT: backward then sees the moved EMA weights
            self._update_ema(k, under_autograd=True)
        return losses

    def local_loss(self, k: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The sum of module k's losses (for measuring and for tests; training uses :meth:`local_losses`)."""
        zero = main_tensor(h).new_zeros((), dtype=torch.float32)
        return sum((item.loss for item in self.local_losses(k, h, batch)), zero)

    def aux_logits(self, k: int, h: torch.Tensor) -> torch.Tensor | None:
        """Class logits of module k's independent aux net for accuracy-by-depth, or None."""
        if k == self.num_modules - 1:
            return None
        independent = self.aux[k].independent
        return independent.logits(independent.input_of(h))

    def after_backward(self, k: int) -> None:
        """Called by the engine after module k's local backward (EMA updates of the reference)."""
        if "ema_before_backward" in self.cfg.legacy:
            return
        if "last_ema_only" in self.cfg.legacy:  # MLAAN CIFAR: EMA_Net[-1] only, after the final backward
            if k == self.num_modules - 1:
                self._update_ema(k - 1)
        elif self.cfg.ema_update == "after_backward":
            self._update_ema(k)

    def after_iteration(self) -> None:
        """Called by the engine after every optimizer has stepped."""
        if self.cfg.ema_update == "after_step" and not {"ema_before_backward", "last_ema_only"} & set(self.cfg.legacy):
            for k in range(self.num_modules - 1):
                self._update_ema(k)

    def _update_ema(self, k: int, under_autograd: bool = False) -> None:
        aux = self.aux[k] if 0 <= k < len(self.aux) else None
        if aux is None:
            return
        for part in (aux.independent, aux.cascade):
            update = getattr(part, "update_ema", None)
            if update is not None:
                update(under_autograd)


def reference_bn_updates(ctx: MethodContext, span: int) -> None:
    """``legacy: [triple_bn]``: BN momentum as if each module ran as many train-mode forwards per step as in the
    reference's stream recomputation (HPFF's and MLAAN's code): once on the independent stream, once per cascade window
    that contains it (windows end at modules span-1..K-2), once more in the final cascade stream (the last
    ``span`` modules); the stem runs once. The repeated forwards see identical inputs and weights, so n updates
    with momentum m equal one update with 1 - (1 - m)^n, exactly."""
    k = len(ctx.ends)
    starts = [0, *ctx.ends[:-1]]
    for j, (start, end) in enumerate(zip(starts, ctx.ends)):
        windows = sum(1 for i in range(span - 1, k - 1) if i - span + 1 <= j <= i)
        runs = 1 + windows + (j >= k - span)
        for unit_index in range(max(start, 1), end):
            for bn in ctx.units[unit_index].modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.momentum is not None:
                    bn.momentum = 1 - (1 - bn.momentum) ** runs


_METHODS: dict[str, type[LocalMethod]] = {}


def register_method(name: str) -> Callable[[type[LocalMethod]], type[LocalMethod]]:
    def wrap(cls: type[LocalMethod]) -> type[LocalMethod]:
        _METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[LocalMethod]:
    if name not in _METHODS:
        raise ValueError(unknown_name("method", name, _METHODS))
    return _METHODS[name]


def build_method(cfg: MethodCfg, ctx: MethodContext) -> LocalMethod:
    return method_class(cfg.name)(ctx, cfg)
