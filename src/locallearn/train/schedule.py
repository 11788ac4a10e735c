"""Learning-rate schedules of spec methods.md §0.4 (InfoPro ``adjust_learning_rate``)."""

from __future__ import annotations

import math

from .config import OptimCfg


def lr_at(cfg: OptimCfg, epoch: int, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate for ``step`` (0-based, within the epoch) of ``epoch`` (0-based) out of ``epochs``.

    Per epoch (``per_step: false``) this is the reference exactly: with e = epoch + 1 in 1..E,
    cosine lr = ½·lr0·(1 + cos(π·e/E)), blended for e ≤ W with ``warmup_lr`` as
    lr·(e−1)/W + warmup_lr·(W+1−e)/W. Per step, e is the continuous progress epoch + step/steps, starting at 0,
    so the curve is smooth and the first step uses ``warmup_lr`` (or lr0 without warm-up).
    """
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
    lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * e / epochs))
    return lr * (e - 1) / warm + cfg.warmup_lr * (warm + 1 - e) / warm if e <= warm else lr
