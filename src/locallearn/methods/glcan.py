"""GLCAN, global-local collaborative auxiliary networks (Zhu et al., arXiv 2406.00446; docs/glcan.md).

Only the abstract is public: each local module's aux net combines a *local* part and a *global* part, designed
together so that every module learns features the final task can use; it is the first local learning for
super-resolution and detection. The design here (full rationale in ``docs/glcan.md``) follows a reading of the
abstract and MAN's momentum idea from the same group (docs/glcan.md, "The aux net of module k"):

    aux_k(h_k) = Global(Local_k(h_k)),  loss_k = task loss (SR: L1 against the HR image)

* **Local_k** (``method.glcan_local``, ``glcan_local_depth``): trainable, fitted to module k — residual blocks or
  3×3 convs at the module's width, then pooling/upsampling to the head's stride and a 1×1 conv to the head's
  width when they differ (:class:`LocalAdapter`).
* **Global** (``method.glcan_global``): the backbone's *own* task head (for EDSR the tail: upsampler and
  reconstruction conv), so every module is trained to produce features that the real head decodes.
  ``per_module``: a trainable copy per module, starting from the head's initial weights (each module adapts its
  own copy). ``ema``: one copy shared by all modules, never trained by aux losses but moved towards the live head
  after every step, θ ← m·θ + (1−m)·θ_head (m = ``ema_decay``), the way MAN's EMA branch follows the next block.
  Sharing trainable weights between modules is not offered: the shared weights would be stepped by K−1
  optimizers and tie the modules together (no gradient isolation, no pipeline placement).

The last module trains the real head with the task loss, as every method here. K=1 is end-to-end training.
Add-ons compose as for DGL: ``man`` puts a momentum bridge in front of the local adapter.

    locallearn train -c configs/sr/edsr_x2_glcan_k4.yaml method.glcan_global=ema
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.edsr import ResBlock, conv3x3
from ..models.units import UnitInfo
from .base import LocalMethod, register_method
from .dgl import DGLObjective
from .objective import Objective

LOCAL_KINDS = ("resblock", "conv", "none")
GLOBAL_KINDS = ("ema", "per_module")


class Shared(nn.Module):
    """Calls a module owned (registered, saved, moved) by someone else: here the method's single EMA head."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._target = (module,)  # a tuple hides it from nn.Module registration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._target[0](x)


class LocalAdapter(nn.Sequential):
    """Module k's feature map (``info``) → the task head's input (``target``): ``depth`` residual blocks or
    conv+ReLU layers at the module's width, a pooling/upsampling step when the strides differ, a 1×1 conv when the
    widths differ. ``none`` with equal width and stride is the identity."""

    def __init__(self, info: UnitInfo, target: UnitInfo, kind: str, depth: int) -> None:
        if kind not in LOCAL_KINDS:
            raise ValueError(f"unknown method.glcan_local {kind!r}; choose one of {', '.join(LOCAL_KINDS)}")
        if depth < 0:
            raise ValueError(f"method.glcan_local_depth must be >= 0, got {depth}")
        c = info.channels
        layers: list[nn.Module] = []
        for _ in range(depth if kind != "none" else 0):
            layers += [ResBlock(c)] if kind == "resblock" else [conv3x3(c, c), nn.ReLU(inplace=True)]
        r, t = info.reduction, target.reduction
        if t > r and t % r == 0:
            layers.append(nn.AvgPool2d(t // r))
        elif r > t and r % t == 0:
            layers.append(nn.Upsample(scale_factor=r // t, mode="nearest"))
        elif r != t:
            raise ValueError(f"glcan: cannot adapt stride {r} of {info.name!r} to the head's stride {t}")
        if c != target.channels:
            layers.append(nn.Conv2d(c, target.channels, 1))
        super().__init__(*layers)


@register_method("glcan")
class GLCAN(LocalMethod):
    default_step = "module"

    def build_objective(self, k: int, info: UnitInfo, independent: bool = False) -> Objective:
        ctx, cfg = self.ctx, self.cfg
        if info.tokens:
            raise ValueError(f"glcan needs (B, C, H, W) feature maps; {info.name!r} is a token map (use dgl)")
        if cfg.glcan_global not in GLOBAL_KINDS:
            raise ValueError(f"unknown method.glcan_global {cfg.glcan_global!r}; choose {', '.join(GLOBAL_KINDS)}")
        task_unit = ctx.units[-1]
        # A task head may say what its global part is (a detector: the dense head at the module's own stride,
        # models/detector.py); by default it is the whole last unit, fed at the width and stride of its input.
        target = task_unit.glcan_target(info) if hasattr(task_unit, "glcan_target") else ctx.unit_infos[-2]
        local = LocalAdapter(info, target, cfg.glcan_local, cfg.glcan_local_depth)
        if cfg.glcan_global == "per_module":
            head: nn.Module = copy.deepcopy(self._global_source())
        else:
            head = Shared(self._global_head())
        if hasattr(task_unit, "glcan_wrap"):
            head = task_unit.glcan_wrap(head, info)
        return DGLObjective(nn.Sequential(local, head), ctx.task)

    def _global_source(self) -> nn.Module:
        """The live module the global part copies (and its EMA follows): the task unit, or the part it names."""
        unit = self.ctx.units[-1]
        return unit.glcan_source() if hasattr(unit, "glcan_source") else unit

    def _global_head(self) -> nn.Module:
        """The shared EMA copy of the live task head (built once, registered on the method)."""
        if getattr(self, "global_head", None) is None:
            if not 0 <= self.cfg.ema_decay < 1:
                raise ValueError(
                    f"method.ema_decay must be in [0, 1) (1.0 never moves the EMA), got {self.cfg.ema_decay}"
                )
            self.global_head = copy.deepcopy(self._global_source())
            for p in self.global_head.parameters():
                p.requires_grad_(False)
        return self.global_head

    def after_iteration(self) -> None:
        """After every optimizer stepped: the shared global head moves towards the live head's new weights."""
        super().after_iteration()
        head = getattr(self, "global_head", None)
        if head is None:
            return
        with torch.no_grad():
            pairs = list(zip(head.parameters(), self._global_source().parameters(), strict=True))
            torch._foreach_lerp_(
                [e for e, _ in pairs], [p.detach().to(e.dtype) for e, p in pairs], 1 - self.cfg.ema_decay
            )
