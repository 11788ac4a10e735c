"""Method options and what a method may know about the network (docs/methods.md, docs/configuration.md).

The config dataclass :class:`MethodCfg`, the add-on and legacy switch names, the papers' add-on presets, and
:class:`MethodContext`. A leaf of :mod:`locallearn.methods`: the method base class, the add-ons and the config
loader all read it, and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..models.units import UnitInfo
from ..tasks.task import Task

ADDONS = ("man", "lam", "pff", "cascade")

# Reference-code behaviours that published numbers depend on, reproduced only when asked (docs/methods.md,
# "Legacy switches"). Defaults follow the papers' intent; each switch is documented on :class:`MethodCfg` ``legacy``.
LEGACY = ("stage_lambda", "last_ema_only", "final_overwrite", "triple_bn", "ema_before_backward")

# The papers' named combinations, as method options (docs/methods.md, "Add-ons"): ``locallearn compare --methods
# dgl+hpff`` and the presets in configs/ use these. HPFF = HiLo (cascade, final loss on both streams) + PFF;
# MLAAN = MLM (cascade, final loss on the cascade stream, as MLAAN CIFAR) + LAM.
ADDON_PRESETS: dict[str, dict[str, object]] = {
    "man": {"addons": ["man"], "bridge_combine": "sum"},
    "manpp": {"addons": ["man"], "bridge_combine": "scaled"},
    "hpff": {"addons": ["cascade", "pff"], "cascade_final": "both"},
    "mlaan": {"addons": ["cascade", "lam"], "cascade_final": "both"},
    # Not a paper's add-on: activation checkpointing inside every module (√units segments), for E2E as well.
    "ckpt": {"checkpoint": "sqrt"},
    # Bridge chains keep their forward activations instead of recomputing them (the behaviour before
    # aux_recompute; for side-by-side memory and time: dgl+man vs dgl+man+keepaux).
    "keepaux": {"aux_recompute": False, "cascade_recompute": False},
}


@dataclass
class MethodCfg:
    """Method and add-on options (names follow the papers; docs/configuration.md, ``method``). Where the
    network is cut (K, presets, balance, ends, cuts) is the split's own config, ``SplitCfg``.

    Attributes:
        name: registered base method (``e2e``, ``dgl``, ``infopro``).
        aux: InfoPro aux head config (``--aux_net_config``), e.g. ``1c2f``.
        widen: ``--aux_net_widen``. feature_dim: ``--aux_net_feature_dim``.
        loss_mode: InfoPro ``--local_loss_mode``: ``contrast`` (SupCon) or ``softmax`` (CE).
        lambdas: InfoPro (ixx_1, ixy_1, ixx_2, ixy_2), the λ schedule (docs/methods.md, "Aux nets and local losses").
        temperature: SupCon temperature.
        dgl_head: DGL aux net ``mlp``, ``mlp-sr`` or ``cnn`` (DGL's ``auxillary_classifier2`` variants).
        aux_init: ``backbone`` (aux nets get the backbone's own init, as the authors' code gives them) or ``torch``
            (torch's defaults, the init this library used before 2026-12-07; docs/methods.md, "Aux-net initialisation").
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
        lam_depth: units in a LAM leap chain (MLAAN: 4 for early splits, fewer near the end).
        cascade_span: modules a cascade loss reaches (HiLo/MLM CIFAR 2, MLAAN ImageNet 3).
        w_ind, w_casc: weights of the independent and cascade losses (reference 0.001 / 0.999).
        cascade_final: last module's loss: ``cascade`` (MLAAN CIFAR: CE reaching the span), ``both``
            (HPFF: w_ind·CE + w_casc·CE reaching the span) or ``plain`` (CE on the last module only).
        man_depth: units of module k+1 the MAN bridge copies (learnable chain; the first gets the EMA twin):
            1 for the CNNs, 2 for MAN++ ViT (its ``MANPP_VIT_AUX_DEPTH``).
        pff_patches: n of the n×n patches (HPFF: 2). pff_sequential: run patches one at a time under activation
            checkpointing, so only one patch's aux activations are alive (same loss and gradients).
        pff_mode: ``paper`` (the whole aux objective runs per patch, outputs averaged: the HPFF paper's form) or
            ``decoder`` (HPFF CIFAR code: only the decoder is patched, one decoder per patch, BCEs summed; the
            head sees the whole map).
        legacy: reference bugs to reproduce a published number (docs/methods.md, "Legacy switches"), any of
            ``stage_lambda`` (MAN/MAN++ CIFAR: λ ratio r = stage of module k+1's first unit / (K_label − 2)),
            ``last_ema_only`` (MLAAN CIFAR: only the last split's EMA moves, after the final backward),
            ``final_overwrite`` (MLAAN CIFAR: the last module's loss is the cascade CE only),
            ``triple_bn`` (HPFF/MLAAN: BN running statistics updated once per reference forward: 2–3 per step),
            ``ema_before_backward`` (MAN++ ViT: EMA moved after the aux forward, before its backward).
        glcan_local: GLCAN's per-module local adapter in front of the global head (docs/glcan.md):
            ``resblock`` (residual blocks at the module's width), ``conv`` (3×3 conv + ReLU layers) or ``none``;
            a 1×1 conv and a pooling/upsampling step are added when the width or stride differ from the head's.
        glcan_local_depth: layers (blocks or convs) in the local adapter.
        checkpoint: activation checkpointing inside each local module (:mod:`locallearn.local.checkpointing`): ``0``
            off, ``n`` segments per module, or ``sqrt`` (round(√units) per module); with ``e2e`` the whole network.
            Same losses, gradients and BatchNorm statistics as without (tested bitwise on CPU).
        aux_recompute: rebuild the activations of MAN/MAN++/LAM bridge chains (copied backbone blocks) during the
            aux backward instead of keeping them (checkpointing inside the aux net; same losses and gradients,
            BatchNorm statistics moved once). On by default: it only trades a re-run of the copies' forward for
            their activations. Not with ``legacy: [ema_before_backward]``.
        cascade_recompute: with a cascade (HPFF, MLAAN), a module's graph keeps only its input and is rebuilt for
            each backward that walks it, instead of staying alive until the next module's cascade loss reaches
            back (on by default: one more forward per module, every activation of the waiting module freed).
        glcan_global: GLCAN's global part, the backbone's own task head (SR: the upsampler + reconstruction):
            ``ema`` (one EMA copy of the live head shared by every module, never trained by the aux losses;
            θ ← m·θ + (1−m)·θ_head after each step with m = ``ema_decay``) or ``per_module`` (a trainable copy
            per module, starting from the head's initial weights).
    """

    name: str = "infopro"
    aux: str = "1c2f"
    widen: int = 1
    feature_dim: int = 128
    loss_mode: Literal["contrast", "softmax"] = "contrast"
    lambdas: list[float] = field(default_factory=lambda: [5.0, 1.0, 0.5, 1.0])
    temperature: float = 0.07
    dgl_head: Literal["mlp", "mlp-sr", "cnn"] = "mlp-sr"
    aux_init: Literal["backbone", "torch"] = "backbone"
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
    checkpoint: int | Literal["sqrt"] = 0
    aux_recompute: bool = True
    cascade_recompute: bool = True


@dataclass
class MethodContext:
    """What a method may know about the network: one :class:`UnitInfo` per module (its last unit), the
    backbone's units and infos (bridges copy later units), where the modules end, the split preset that put
    them there (a paper's K label for a legacy schedule), and the backbone's weight init, which the aux nets
    get too (``UnitBackbone.weight_init``; None keeps torch's defaults)."""

    module_infos: list[UnitInfo]
    num_stages: int
    image_channels: int
    task: Task
    units: list[nn.Module] = field(default_factory=list)
    unit_infos: list[UnitInfo] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    split_preset: str = "auto"
    weight_init: Callable[[nn.Module], None] | None = None

    @property
    def num_modules(self) -> int:
        return len(self.module_infos)
