"""``fit``: build a run (from a config, or from your own model and DataLoaders), then let the
:class:`~locallearn.train.trainer.Trainer` run it in one process; and what resuming may change.

    locallearn train -c configs/fmnist/demo.yaml method.name=dgl split.k=4
    locallearn train --resume runs/2026-11-23_101500_resnet14_dgl_k4

    ll.fit(ll.load_config(None, ["method.name=dgl", "split.k=3"]), model=my_model, train_loader=my_loader)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tasks.task import Task
from .build import (
    build_engine,
    build_loaders,
    engine_from_model,
    resolve_device,
    resolve_time_balance,
    run_name,
    stream_seed,
)
from .checkpoint import load_checkpoint
from .config import ConfigError, TrainCfg, apply_overrides, changed_keys, config_from_dict, to_dict
from .rundir import check_tensorboard, latest_run_dir, make_dir, new_run_dir
from .runtime import LocalRuntime
from .trainer import Trainer
from .user_loader import UserLoader, as_loader

# On resume only these may differ from the saved config (how long to train, where, how verbosely).
RESUMABLE_CHANGES = {
    "run.epochs",
    "run.max_steps",
    "run.progress",
    "run.threads",
    "run.device",
    "run.ckpt_every",
    "run.ckpt_minutes",
    "run.eval_every",
    "log.tensorboard",
    "log.every",
    "log.seconds",
}


def python_config(cfg: TrainCfg | None, model: nn.Module) -> TrainCfg | None:
    """A config whose model and data come from Python: its ``data`` and ``model`` names say so (the run folder is
    named after the model's class), the rest is the caller's."""
    if cfg is None:  # (resuming: the saved config, which says so already)
        return None
    return replace(
        cfg,
        data=replace(cfg.data, name="python"),
        model=replace(cfg.model, name=f"python:{type(model).__name__}"),
    )


def checkpoint_path(run: str | Path) -> Path:
    """A run directory's ``ckpt_last.pt``, or the checkpoint file itself."""
    path = Path(run)
    return path / "ckpt_last.pt" if path.is_dir() else path


def latest_run(cfg: TrainCfg) -> str | None:
    """``--resume auto``: the newest folder of ``run.out`` for this config's run name that holds a checkpoint."""
    found = latest_run_dir(cfg.run.out, run_name(cfg))
    return None if found is None else str(found)


def resumed_config(
    saved: dict[str, Any],
    cfg: TrainCfg | None,
    overrides: list[str] | tuple = (),
    run_dir: str | Path = "",
    resumable: set[str] = RESUMABLE_CHANGES,
) -> TrainCfg:
    """The config of a resumed run: ``cfg``, or the ``saved`` one with ``overrides``; refused if anything but the
    ``resumable`` keys differ from the saved config (also used by the multi-process runtimes)."""
    saved = to_dict(config_from_dict(saved))  # a fresh copy (overrides edit nested dicts in place)
    cfg = config_from_dict(apply_overrides(to_dict(config_from_dict(saved)), list(overrides))) if cfg is None else cfg
    changed = changed_keys(saved, to_dict(cfg)) - resumable
    if changed:
        raise ConfigError(
            f"--resume {run_dir}: {', '.join(sorted(changed))} differ from the run's config; "
            f"only {', '.join(sorted(resumable))} may change on resume"
        )
    return cfg


def fit(
    cfg: TrainCfg | None = None,
    *,
    resume: str | Path | None = None,
    overrides: list[str] | tuple = (),
    quiet: bool = False,
    model: nn.Module | None = None,
    train_loader: Iterable[Any] | None = None,
    test_loader: Iterable[Any] | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """Train one run, or continue ``resume`` (a run directory or checkpoint) with the same data order and RNG
    state. When resuming without ``cfg``, ``overrides`` (``run.epochs=...``) apply to the saved config.
    Returns the last epoch's metrics and ``run_dir``.

    Your own model and data: ``model`` (an ``nn.Module`` as it is, captured and cut by ``cfg.split``) with
    ``train_loader`` and optionally ``test_loader`` (a ``DataLoader``, a list of ``(input, target)`` batches, a
    ``Dataset``, or ``(inputs, targets)`` tensors; the last two batched by ``data.batch_size`` /
    ``data.eval_batch_size``, training shuffled);
    ``task`` defaults to classification over the model's output width. The config's ``method``, ``split``,
    ``optim``, ``run`` and ``log`` apply (lr schedule, checkpoints, logs, resume); its ``data`` and ``model``
    sections are not used and are saved as ``python``. To resume, pass the same model class and loaders again."""
    own = model is not None or train_loader is not None
    if own and (model is None or train_loader is None):
        raise ConfigError("fit with your own data needs both model= and train_loader=")
    if own:
        cfg = python_config(cfg if cfg is not None or resume is not None else TrainCfg(), model)
    state = None
    if resume is not None:
        ckpt = checkpoint_path(resume)
        state = load_checkpoint(ckpt)
        run_dir = ckpt.parent
        cfg = resumed_config(state["config"], cfg, overrides, run_dir)
    if cfg is None:
        raise ConfigError("fit needs a config or a run to resume")
    if cfg.parallel != "none":
        raise ConfigError(f"parallel={cfg.parallel} runs through locallearn.parallel, not the single-process fit")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    make_dir(cfg.run.out)  # an unusable output folder fails now, not after the data and model are built
    check_tensorboard(cfg.log.tensorboard)

    if own:
        seed = stream_seed(cfg.run.seed, "data")
        train_loader = as_loader(train_loader, cfg.data.batch_size, train=True)
        train_loader = UserLoader(train_loader, device, cfg.model.channels_last, seed)
        if test_loader is not None:
            test_loader = as_loader(test_loader, cfg.data.eval_batch_size, train=False)
            test_loader = UserLoader(test_loader, device, cfg.model.channels_last, seed)
        engine = engine_from_model(cfg, model, task, device, next(iter(train_loader.batches(0)))[0])
    else:
        train_loader, test_loader, spec = build_loaders(cfg, device)
        cfg = resolve_time_balance(cfg, spec, device, train_loader, quiet)
        engine = build_engine(cfg, spec, device, next(iter(test_loader))[0][: cfg.data.batch_size])
    if state is None:
        run_dir = new_run_dir(cfg.run.out, run_name(cfg))
    runtime = LocalRuntime(engine, train_loader, test_loader, run_dir, state)
    return Trainer(cfg, runtime, resume=state is not None, quiet=quiet).fit()
