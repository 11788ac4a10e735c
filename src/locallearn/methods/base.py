"""The method contract (design rule: a method only builds aux nets and returns local losses).

A method is an ``nn.Module`` holding one *objective* (aux net + loss) per local module. The engine calls
:meth:`LocalMethod.local_losses` on each module's output and alone calls ``backward``/``step``, so the
single-process engine and the pipeline runtime run the very same method objects.

Add-ons compose with any base (spec methods.md §8, §10.1): a base method (``dgl``, ``infopro``) only says how to
build the objective for a feature map described by a :class:`UnitInfo`; ``method.addons`` then wraps it:

* ``man`` — momentum bridge (MAN, MAN++ with ``bridge_combine: scaled``): learnable + EMA copies of the next
  module's first unit in front of the objective (:mod:`.bridge`, spec §3.2);
* ``lam`` — leap augmented modules (MLAAN): the same bridge over a leap chain of later units (spec §5.3);
* ``pff`` — patch feature fusion (HPFF): the objective runs on n×n patches, outputs averaged (:mod:`.pff`, §4.3);
* ``cascade`` — HiLo / MLM: a second objective whose loss reaches the ``cascade_span`` modules ending here
  (spec §4.2, §5.2, §10.1.5); the engine routes each loss's gradient by its ``reach``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import nn

from ..local.task import Batch, Task
from ..models.units import UnitInfo

ADDONS = ("man", "lam", "pff", "cascade")

# Reference-code behaviours that published numbers depend on, reproduced only when asked (spec §3.6, §4.6, §5.6,
# §10.4). Defaults follow the papers' intent; each switch is documented on :class:`MethodCfg` ``legacy``.
LEGACY = ("stage_lambda", "last_ema_only", "final_overwrite", "triple_bn", "ema_before_backward")

# The papers' named combinations, as method options (spec §3–5): ``locallearn compare --methods dgl+hpff`` and the
# presets in configs/ use these. HPFF = HiLo (cascade, final loss on both streams) + PFF; MLAAN = MLM (cascade,
# final loss on the cascade stream, as MLAAN CIFAR) + LAM.
ADDON_PRESETS: dict[str, dict[str, object]] = {
    "man": {"addons": ["man"], "bridge_combine": "sum"},
    "manpp": {"addons": ["man"], "bridge_combine": "scaled"},
    "hpff": {"addons": ["cascade", "pff"], "cascade_final": "both"},
    "mlaan": {"addons": ["cascade", "lam"], "cascade_final": "both"},
}


@dataclass
class MethodCfg:
    """Method, split and add-on options (names follow the papers; spec methods.md §1–5, engineering.md §3.3).

    Attributes:
        name: registered base method (``e2e``, ``dgl``, ``infopro``).
        k: number of gradient-isolated local modules (the true count); None = the method's default (e2e 1, else 4).
        split: ``auto`` (balanced by ``balance``), a paper preset (``infopro``, ``infopro_star``, ``man``, ...) or
            ``ends`` (use the explicit ``ends`` list).
        balance: cost an automatic split balances: ``units``, ``params``, ``flops``, ``activations`` or ``time``
            (measured forward + backward seconds per unit *and* of the aux net at each split point, for pipeline
            throughput; resolved to explicit ``ends`` once, by ``locallearn train``/``summary``).
        ends: explicit exclusive end unit index of each module (with ``split: ends``).
        aux: InfoPro aux head config (``--aux_net_config``), e.g. ``1c2f``.
        widen: ``--aux_net_widen``. feature_dim: ``--aux_net_feature_dim``.
        loss_mode: InfoPro ``--local_loss_mode``: ``contrast`` (SupCon) or ``softmax`` (CE).
        lambdas: InfoPro (ixx_1, ixy_1, ixx_2, ixy_2), the λ schedule of spec §2.3.
        temperature: SupCon temperature.
        dgl_head: DGL aux net ``mlp``, ``mlp-sr`` or ``cnn`` (spec §1.2).
        step: ``module`` steps each module's optimizer right after its backward (DGL); ``end`` steps all after
            the last backward (InfoPro reference); None = the method's default. Cascades always step at the end.
        addons: any subset of ``man``, ``lam``, ``pff``, ``cascade`` (``man`` and ``lam`` exclude each other).
        bridge_combine: ``sum`` (MAN: LB(h) + EMA(h)), ``scaled`` (MAN++: s·LB + (2−s)·EMA, s learnable from 1),
            ``none`` (learnable copies only).
        ema_decay: EMA momentum m in θ ← m·θ + (1−m)·θ_live (papers: 0.995); 1.0 is rejected.
        ema_warmup: use m_t = min(m, (1+t)/(10+t)) at the t-th update (t = 0, 1, ...), the warm-up of
            TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, so a short run's EMA copies follow their
            source from the first steps instead of averaging in ~1/(1−m) steps of stale weights (MAN, MAN++
            and LAM bridges; the count is saved with the method's state).
        ema_update: ``after_backward`` (reference: the source's pre-step weights) or ``after_step``.
        ema_init: ``copy`` (copies start equal to their source units) or ``random`` (the reference re-initialises
            the copies; reproduces published numbers).
        n_ema: how many of the bridge's sources get an EMA twin (MAN, LAM reference: 1).
        lam_depth: units in a LAM leap chain (spec §5.3: 4 for early splits, fewer near the end).
        cascade_span: modules a cascade loss reaches (HiLo/MLM CIFAR 2, MLAAN ImageNet 3).
        w_ind, w_casc: weights of the independent and cascade losses (reference 0.001 / 0.999).
        cascade_final: last module's loss: ``cascade`` (MLAAN CIFAR: CE reaching the span), ``both``
            (HPFF: w_ind·CE + w_casc·CE reaching the span) or ``plain`` (CE on the last module only).
        man_depth: units of module k+1 the MAN bridge copies (learnable chain; the first gets the EMA twin):
            1 for the CNNs, 2 for MAN++ ViT (spec §3.2).
        pff_patches: n of the n×n patches (HPFF: 2). pff_sequential: run patches one at a time under activation
            checkpointing, so only one patch's aux activations are alive (same loss and gradients).
        pff_mode: ``paper`` (the whole aux objective runs per patch, outputs averaged: spec §4.3 paper) or
            ``decoder`` (HPFF CIFAR code: only the decoder is patched, one decoder per patch, BCEs summed; the
            head sees the whole map).
        legacy: reference bugs to reproduce a published number (spec §10.4), any of
            ``stage_lambda`` (MAN/MAN++ CIFAR: λ ratio r = stage of module k+1's first unit / (K_label − 2)),
            ``last_ema_only`` (MLAAN CIFAR: only the last split's EMA moves, after the final backward),
            ``final_overwrite`` (MLAAN CIFAR: the last module's loss is the cascade CE only),
            ``triple_bn`` (HPFF/MLAAN: BN running statistics updated once per reference forward: 2–3 per step),
            ``ema_before_backward`` (MAN++ ViT: EMA moved after the aux forward, before its backward).
        glcan_local: GLCAN's per-module local adapter in front of the global head (spec §6, docs/glcan.md):
            ``resblock`` (residual blocks at the module's width), ``conv`` (3×3 conv + ReLU layers) or ``none``;
            a 1×1 conv and a pooling/upsampling step are added when the width or stride differ from the head's.
        glcan_local_depth: layers (blocks or convs) in the local adapter.
        glcan_global: GLCAN's global part, the backbone's own task head (SR: the upsampler + reconstruction):
            ``ema`` (one EMA copy of the live head shared by every module, never trained by the aux losses;
            θ ← m·θ + (1−m)·θ_head after each step with m = ``ema_decay``) or ``per_module`` (a trainable copy
            per module, starting from the head's initial weights).
    """

    name: str = "infopro"
    k: int | None = None
    split: str = "auto"
    balance: Literal["units", "params", "flops", "activations", "time"] = "units"
    ends: list[int] = field(default_factory=list)
    aux: str = "1c2f"
    widen: int = 1
    feature_dim: int = 128
    loss_mode: Literal["contrast", "softmax"] = "contrast"
    lambdas: list[float] = field(default_factory=lambda: [5.0, 1.0, 0.5, 1.0])
    temperature: float = 0.07
    dgl_head: Literal["mlp", "mlp-sr", "cnn"] = "mlp-sr"
    step: Literal["module", "end"] | None = None
    addons: list[str] = field(default_factory=list)
    bridge_combine: Literal["sum", "scaled", "none"] = "sum"
    ema_decay: float = 0.995
    ema_warmup: bool = False
    ema_update: Literal["after_backward", "after_step"] = "after_backward"
    ema_init: Literal["copy", "random"] = "copy"
    n_ema: int = 1
    lam_depth: int = 4
    cascade_span: int = 2
    w_ind: float = 0.001
    w_casc: float = 0.999
    cascade_final: Literal["cascade", "both", "plain"] = "cascade"
    pff_patches: int = 2
    pff_sequential: bool = False
    man_depth: int = 1
    pff_mode: Literal["paper", "decoder"] = "paper"
    legacy: list[str] = field(default_factory=list)
    glcan_local: Literal["resblock", "conv", "none"] = "resblock"
    glcan_local_depth: int = 1
    glcan_global: Literal["ema", "per_module"] = "per_module"


@dataclass
class MethodContext:
    """What a method may know about the network: one :class:`UnitInfo` per module (its last unit), the
    backbone's units and infos (bridges copy later units), and where the modules end."""

    module_infos: list[UnitInfo]
    num_stages: int
    image_channels: int
    task: Task
    units: list[nn.Module] = field(default_factory=list)
    unit_infos: list[UnitInfo] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @property
    def num_modules(self) -> int:
        return len(self.module_infos)


class LocalLoss(NamedTuple):
    """A loss and how many modules its gradient may reach, counting back from the one that produced ``h``
    (1 = that module only; a cascade of span k reaches k)."""

    loss: torch.Tensor
    reach: int = 1


class Objective(nn.Module):
    """An aux net and its loss on one module's output (spec §10.1.3 ``LocalObjective``).

    ``outputs`` maps the feature map to a tuple of tensors (logits, reconstruction, ...; None for unused parts);
    ``loss_from`` turns them into the loss. The split lets :class:`~.pff.PatchFusion` average the outputs of
    patches before the loss, whatever the objective.
    """

    def outputs(self, h: torch.Tensor, batch: Batch) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def loss_from(self, outputs: tuple[torch.Tensor | None, ...], batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss_from(self.outputs(h, batch), batch)

    def logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """Class logits for accuracy-by-depth, or None (e.g. a contrastive projection)."""
        return None


class ModuleAux(nn.Module):
    """Everything module k's losses use: the independent objective and, with ``cascade``, the cascade one."""

    def __init__(self, independent: Objective | None, cascade: Objective | None = None) -> None:
        super().__init__()
        self.independent, self.cascade = independent, cascade


class LocalMethod(nn.Module):
    """Base class: builds one :class:`ModuleAux` per module (with add-ons) and returns local losses.

    Subclasses implement :meth:`build_objective` (the base aux net at a feature map); the last module's
    loss is the task loss.
    """

    default_k: int = 4
    default_step: str = "module"

    def __init__(self, ctx: MethodContext, cfg: MethodCfg) -> None:
        super().__init__()
        from .bridge import build_bridged  # add-ons live in their own files; imported here to avoid a cycle

        self.ctx, self.cfg = ctx, cfg
        unknown = [a for a in cfg.addons if a not in ADDONS]
        if unknown:
            raise ValueError(f"unknown add-on {unknown[0]!r} in method.addons; choose from {', '.join(ADDONS)}")
        if "man" in cfg.addons and "lam" in cfg.addons:
            raise ValueError("method.addons: 'man' and 'lam' both prefix the aux net with copies; pick one")
        if cfg.cascade_span < 1:
            raise ValueError(f"method.cascade_span must be >= 1, got {cfg.cascade_span}")
        bad = [name for name in cfg.legacy if name not in LEGACY]
        if bad:
            raise ValueError(f"unknown method.legacy switch {bad[0]!r}; choose from {', '.join(LEGACY)}")
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
        if "pff" in cfg.addons and cfg.pff_mode == "decoder" and ctx.num_modules > 1:
            from .pff import PatchDecoders

            if not any(isinstance(m, PatchDecoders) for m in self.modules()):
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

    def local_losses(self, k: int, h: torch.Tensor, batch: Batch) -> list[LocalLoss]:
        """The losses module k's output contributes, each with its reach."""
        last = k == self.num_modules - 1
        if last:
            task_loss = self.ctx.task.loss(h, batch)
            if self.span == 1 or self.final_mode == "plain":
                return [LocalLoss(task_loss)]
            if self.final_mode == "cascade":
                return [LocalLoss(task_loss, self.span)]
            return [LocalLoss(self.cfg.w_ind * task_loss), LocalLoss(self.cfg.w_casc * task_loss, self.span)]
        aux = self.aux[k]
        if aux.cascade is None:
            losses = [LocalLoss(aux.independent.loss(h, batch))]
        else:
            losses = [
                LocalLoss(self.cfg.w_ind * aux.independent.loss(h, batch)),
                LocalLoss(self.cfg.w_casc * aux.cascade.loss(h, batch), self.span),
            ]
        if "ema_before_backward" in self.cfg.legacy:  # MAN++ ViT: backward then sees the moved EMA weights
            self._update_ema(k, under_autograd=True)
        return losses

    def local_loss(self, k: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The sum of module k's losses (for measuring and for tests; training uses :meth:`local_losses`)."""
        return sum((item.loss for item in self.local_losses(k, h, batch)), h.new_zeros((), dtype=torch.float32))

    def aux_logits(self, k: int, h: torch.Tensor) -> torch.Tensor | None:
        """Class logits of module k's independent aux net for accuracy-by-depth, or None."""
        if k == self.num_modules - 1:
            return None
        return self.aux[k].independent.logits(h)

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
    reference's stream recomputation (spec §4.2, §4.6): once on the independent stream, once per cascade window
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
        hint = difflib.get_close_matches(name, _METHODS, n=1)
        more = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown method {name!r}{more} Known methods: {', '.join(list_methods())}")
    return _METHODS[name]


def resolve_k(cfg: MethodCfg) -> int:
    """The module count a config asks for: ``method.k`` or the method's default."""
    return method_class(cfg.name).default_k if cfg.k is None else cfg.k


def build_method(cfg: MethodCfg, ctx: MethodContext) -> LocalMethod:
    return method_class(cfg.name)(ctx, cfg)
