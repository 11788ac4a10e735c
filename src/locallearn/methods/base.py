"""The method contract (design rule: a method only builds aux nets and returns local losses).

A method is an ``nn.Module`` holding one aux net per local module (``None`` where a module needs none). The engine
calls :meth:`LocalMethod.local_loss` on each module's output and alone calls ``backward``/``step``, so the
single-process engine and the pipeline runtime run the very same method objects.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..local.task import Batch, ClassificationTask
from ..models.units import UnitInfo


@dataclass
class MethodCfg:
    """Method and split options (names follow the papers; spec methods.md §1–2, engineering.md §3.3).

    Attributes:
        name: registered method (``e2e``, ``dgl``, ``infopro``).
        k: number of gradient-isolated local modules (the true count); None = the method's default (e2e 1, else 4).
        split: ``auto`` (balanced by ``balance``), a paper preset (``infopro``, ``infopro_star``, ...) or
            ``ends`` (use the explicit ``ends`` list).
        balance: cost an automatic split balances: ``units``, ``params``, ``flops`` or ``activations``.
        ends: explicit exclusive end unit index of each module (with ``split: ends``).
        aux: InfoPro aux head config (``--aux_net_config``), e.g. ``1c2f``.
        widen: ``--aux_net_widen``. feature_dim: ``--aux_net_feature_dim``.
        loss_mode: InfoPro ``--local_loss_mode``: ``contrast`` (SupCon) or ``softmax`` (CE).
        lambdas: InfoPro (ixx_1, ixy_1, ixx_2, ixy_2), the λ schedule of spec §2.3.
        temperature: SupCon temperature.
        dgl_head: DGL aux net ``mlp``, ``mlp-sr`` or ``cnn`` (spec §1.2).
        step: ``module`` steps each module's optimizer right after its backward (DGL); ``end`` steps all after
            the last backward (InfoPro reference); None = the method's default.
    """

    name: str = "infopro"
    k: int | None = None
    split: str = "auto"
    balance: Literal["units", "params", "flops", "activations"] = "units"
    ends: list[int] = field(default_factory=list)
    aux: str = "1c2f"
    widen: int = 1
    feature_dim: int = 128
    loss_mode: Literal["contrast", "softmax"] = "contrast"
    lambdas: list[float] = field(default_factory=lambda: [5.0, 1.0, 0.5, 1.0])
    temperature: float = 0.07
    dgl_head: Literal["mlp", "mlp-sr", "cnn"] = "mlp-sr"
    step: Literal["module", "end"] | None = None


@dataclass
class MethodContext:
    """What a method may know about the network it trains: one :class:`UnitInfo` per module (its last unit)."""

    module_infos: list[UnitInfo]
    num_stages: int
    image_channels: int
    task: ClassificationTask

    @property
    def num_modules(self) -> int:
        return len(self.module_infos)


class LocalMethod(nn.Module):
    """Base class. Subclasses fill ``self.aux`` and override :meth:`aux_loss`."""

    default_k: int = 4
    default_step: str = "module"

    def __init__(self, ctx: MethodContext, cfg: MethodCfg) -> None:
        super().__init__()
        self.ctx, self.cfg = ctx, cfg
        self.aux = nn.ModuleList()

    @property
    def num_modules(self) -> int:
        return self.ctx.num_modules

    def local_loss(self, k: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Loss whose gradient trains module k (and its aux net). The last module's loss is the task loss."""
        if k == self.num_modules - 1:
            return self.ctx.task.loss(h, batch)
        return self.aux_loss(k, h, batch)

    def aux_loss(self, k: int, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def aux_logits(self, k: int, h: torch.Tensor) -> torch.Tensor | None:
        """Class logits of module k's aux net for accuracy-by-depth, or None if it has no classifier."""
        return None


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
