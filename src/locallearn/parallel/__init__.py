"""Multi-process runtimes (docs/pipeline.md): PPLL, one process per local module, optionally replicated on a 2-D mesh
(:mod:`.ppll`, protocol :mod:`.link`, cross-stage add-ons :mod:`.cross_stage`); data-parallel local learning
(:mod:`.data_parallel`); how ranks start (:mod:`.launch`); the pipeline baselines (:mod:`.pipeline_baselines`).

:func:`fit_parallel` is what ``locallearn train`` calls for ``parallel: ppll | dp`` and for ``--resume`` of such
a run (under torchrun every rank calls it; without torchrun it spawns ``ppll.procs`` ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..train.checkpoint import load_checkpoint
from ..train.config import ConfigError, TrainCfg
from ..train.entry import RESUMABLE_CHANGES, resumed_config
from ..train.rundir import check_tensorboard

# On resume these may change too: they do not change what is computed.
RESUMABLE = RESUMABLE_CHANGES | {"ppll.timeout", "ppll.window", "ppll.procs", "ppll.pin_cores"}


def _run_dir(resume: str | Path) -> Path:
    path = Path(resume)
    return path.parent if path.is_file() else path


def wants_parallel(cfg: TrainCfg | None, resume: str | Path | None = None) -> bool:
    """Does this config, or the run being resumed, use a multi-process runtime?"""
    if cfg is not None:
        return cfg.parallel != "none"
    if resume is None:
        return False
    run = _run_dir(resume)
    if (run / "ckpt_stage0.pt").is_file():
        return True
    saved = run / "config.yaml"
    return saved.is_file() and (yaml.safe_load(saved.read_text()) or {}).get("parallel", "none") != "none"


def fit_parallel(
    cfg: TrainCfg | None = None, *, resume: str | Path | None = None, overrides: list[str] | tuple = ()
) -> dict[str, Any] | None:
    """Train (or, with ``resume``, continue) a ``parallel: ppll | dp`` run; rank 0's metrics (None elsewhere)."""
    if resume is not None:
        run = _run_dir(resume)
        stage0 = run / "ckpt_stage0.pt"
        saved = load_checkpoint(stage0 if stage0.is_file() else run / "ckpt_last.pt")["config"]
        cfg = resumed_config(saved, cfg, overrides, run, RESUMABLE)
        resume = str(run)
    if cfg is None:
        raise ConfigError("fit_parallel needs a config or a run to resume")
    check_tensorboard(cfg.log.tensorboard)
    if cfg.parallel == "ppll":
        from .ppll import fit_ppll

        return fit_ppll(cfg, resume)
    if cfg.parallel == "dp":
        from .data_parallel import fit_dp

        return fit_dp(cfg, resume)
    raise ConfigError(f"parallel={cfg.parallel} is the single-process fit, not a multi-process runtime")


__all__ = ["RESUMABLE", "fit_parallel", "wants_parallel"]
