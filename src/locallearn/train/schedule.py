"""Optimizers and learning-rate schedules of the papers: InfoPro's ``adjust_learning_rate`` and MAN++'s AdamW for
ViTs (docs/configuration.md, "The papers' optimizer recipes")."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import OptimCfg


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimCfg) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names, over ``params`` (one local module and its aux net; the engine builds
    one per module). ``sgd``: Nesterov only with momentum (torch rejects Nesterov without it).
    ``adamw``: decoupled weight decay. The learning rate is set per step by :func:`lr_at`."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adamw":
        if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {cfg.betas}")
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer optim.name={cfg.name!r}; choose sgd or adamw")


def lr_at(cfg: OptimCfg, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate for ``step`` (0-based, within the epoch) of ``epoch`` (0-based) out of ``epochs``.

    Per epoch (``per_step: false``) this is the reference exactly: with e = epoch + 1 in 1..E,
    cosine lr = ½·lr0·(1 + cos(π·e/E)), blended for e ≤ W with ``warmup_lr`` as
    lr·(e−1)/W + warmup_lr·(W+1−e)/W. With ``first_epoch: 0`` the cosine index is epoch (0..E−1) instead, as
    the ImageNet scripts (no warm-up there; the blend keeps counting e from 1). Per step, e is the continuous
    progress epoch + step/steps, starting at 0, so the curve is smooth and the first step uses ``warmup_lr`` (or
    lr0 without warm-up)."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    warm = cfg.warmup_epochs
    if cfg.per_step:
        t = epoch + step / max(1, steps_per_epoch)
        lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * t / epochs))
        return lr * t / warm + cfg.warmup_lr * (1 - t / warm) if t < warm else lr
    e = epoch + 1
    lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch + cfg.first_epoch) / epochs))
    return lr * (e - 1) / warm + cfg.warmup_lr * (warm + 1 - e) / warm if e <= warm else lr


class StepSchedule:
    """The config's learning-rate schedule for a loop you write yourself around ``engine.train_step``: call
    ``step(engine)`` before every training step; it sets the lr :func:`lr_at` gives for that step, as the
    trainer does, so a cosine schedule is never silently constant. ``state_dict()`` / ``load_state_dict()`` carry
    the step count through your own checkpoints."""

    def __init__(self, cfg: OptimCfg, steps_per_epoch: int, epochs: int) -> None:
        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(f"a schedule needs steps_per_epoch >= 1 and epochs >= 1, got {steps_per_epoch}, {epochs}")
        self.cfg, self.steps_per_epoch, self.epochs, self.done = cfg, steps_per_epoch, epochs, 0

    def step(self, engine: object) -> float:
        """Set ``engine``'s lr for the coming step (anything with ``set_lr``) and return it."""
        epoch, step = divmod(self.done, self.steps_per_epoch)
        lr = lr_at(self.cfg, epoch, step, self.steps_per_epoch, self.epochs)
        engine.set_lr(lr)
        self.done += 1
        return lr

    def state_dict(self) -> dict[str, int]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.done = int(state["done"])
