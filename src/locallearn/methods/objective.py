"""The pieces a method is made of: :class:`Objective` (an aux net and its loss), :class:`ModuleAux` (a module's
objectives) and :class:`LocalLoss` (a loss and how far its gradient may reach). The add-ons (:mod:`.bridge`,
:mod:`.pff`) wrap objectives, and :class:`ObjectiveBuilder` is all they need of a method, so they never import
the method base class (docs/api.md, "Writing a method").
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import nn

from ..models.units import UnitInfo, main_tensor
from ..tasks.task import Batch
from .options import MethodCfg, MethodContext


class LocalLoss(NamedTuple):
    """A loss and how many modules its gradient may reach, counting back from the one that produced ``h``
    (1 = that module only; a cascade of span k reaches k)."""

    loss: torch.Tensor
    reach: int = 1


class Objective(nn.Module):
    """An aux net and its loss on one module's output.

    ``outputs`` maps the feature map to a tuple of tensors (logits, reconstruction, ...; None for unused parts);
    ``loss_from`` turns them into the loss. The split lets :class:`~.pff.PatchFusion` average the outputs of
    patches before the loss, whatever the objective.
    """

    # Objectives see a module's main tensor; one with ``takes_carry`` (a bridge, which runs copies of the next
    # units) gets the whole carry of a captured model (locallearn.models.capture); input_of picks.
    takes_carry = False

    def input_of(self, h: object) -> object:
        return h if self.takes_carry else main_tensor(h)

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


class ObjectiveBuilder(Protocol):
    """What an add-on needs of its method (:class:`~.base.LocalMethod` is one): the options, the network
    context, and the base objective at a feature map."""

    cfg: MethodCfg
    ctx: MethodContext

    def build_objective(self, k: int, info: UnitInfo, independent: bool = False) -> Objective: ...

    def init_aux(self, module: nn.Module) -> nn.Module: ...
