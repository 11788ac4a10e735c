"""``fit``: the training loop behind ``locallearn train`` (read it top to bottom: data, model, loop, checkpoint).

    locallearn train -c configs/fmnist/demo.yaml method.name=dgl method.k=4
    locallearn train --resume runs/2026-11-23_101500_resnet14_dgl_k4

Seeds: the backbone, the aux nets and the data each have their own stream derived from ``run.seed``, so
switching method never changes the data order or the backbone's initial weights, and one seed gives one run
(bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.datasets import dataset_spec, load_split
from ..data.loader import ResidentLoader
from ..data.sr import sr_loaders
from ..local.detection import DetectionTask
from ..local.task import Batch, ClassificationTask, SuperResolutionTask, Task
from ..measure.memory import SavedTensorMeter, cuda_peak_bytes, reset_cuda_peak
from ..methods.base import resolve_k
from ..methods.options import MethodCfg
from ..models.capture import CaptureError
from ..models.registry import create_model, import_builder, is_import_path
from ..models.units import UnitBackbone
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, TrainCfg, apply_overrides, changed_keys, config_from_dict, dump_config, to_dict
from .engine import LocalEngine
from .partition import time_balanced_method
from .rundir import MetricsLog, check_tensorboard, environment, make_dir, new_run_dir
from .schedule import lr_at

# On resume only these may differ from the saved config (how long to train, where, how verbosely).
RESUMABLE_CHANGES = {
    "run.epochs",
    "run.max_steps",
    "run.progress",
    "run.threads",
    "run.device",
    "run.ckpt_every",
    "run.eval_every",
    "log.tensorboard",
}
METER_STEPS = 2  # steps measured by the saved-tensor meter (the peak is the same every step at a fixed shape)


def stream_seed(seed: int, stream: str) -> int:
    """Independent seeds for the ``backbone``, ``aux`` and ``data`` streams of one run seed."""
    key = {"backbone": 0, "aux": 1, "data": 2}[stream]
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a device. On CUDA, cuDNN's autotuner is switched on: every step has the same shapes (the
    ragged last batch costs one extra search), so each convolution gets its fastest algorithm."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={name} but CUDA is not available here; use run.device=cpu or auto")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def build_loaders(cfg: TrainCfg, device: torch.device) -> tuple[Any, Any, Any]:
    spec = dataset_spec(cfg.data.name)
    if spec.task == "super_resolution":  # image pairs, random patches / whole images (data/sr.py)
        d = cfg.data
        train, test = sr_loaders(
            spec,
            d.root,
            scale=d.scale,
            patch_size=d.patch_size,
            batch_size=d.batch_size,
            repeat=d.repeat,
            augment=spec.flip if d.flip is None else d.flip,
            limit_train=d.limit_train,
            limit_test=d.limit_test,
            test_root=d.test_root,
            seed=stream_seed(cfg.run.seed, "data"),
            device=device,
            channels_last=cfg.model.channels_last,
            num_workers=d.num_workers,
        )
        return train, test, spec
    if spec.loaders is not None:  # class folders (ImageNet): decoded in DataLoader workers (data/imagefolder.py)
        return spec.loaders(spec, cfg.data, device, stream_seed(cfg.run.seed, "data"), cfg.model.channels_last)
    if cfg.data.image_size is not None:
        raise ConfigError(f"data.image_size applies to class-folder datasets only, not {cfg.data.name}; unset it")
    loaders = []
    for split, limit, train in (("train", cfg.data.limit_train, True), ("test", cfg.data.limit_test, False)):
        images, labels = load_split(cfg.data.name, cfg.data.root, split)
        if limit:
            images, labels = images[:limit], labels[:limit]
        loaders.append(
            ResidentLoader(
                images,
                labels,
                cfg.data.batch_size if train else cfg.data.eval_batch_size,
                train=train,
                mean=spec.mean,
                std=spec.std,
                pad=spec.pad if cfg.data.pad is None else cfg.data.pad,
                pad_mode=cfg.data.pad_mode or spec.pad_mode,
                flip=spec.flip if cfg.data.flip is None else cfg.data.flip,
                seed=stream_seed(cfg.run.seed, "data"),
                device=device,
                channels_last=cfg.model.channels_last,
            )
        )
    return loaders[0], loaders[1], spec


def build_task(cfg: TrainCfg, spec: Any) -> Task:
    """The dataset's task: classification with its class count, or super-resolution by ``data.scale``."""
    if spec.task == "super_resolution":
        return SuperResolutionTask(cfg.data.scale)
    if spec.task == "detection":
        return DetectionTask(list(spec.classes))
    return ClassificationTask(spec.num_classes)


def build_engine(cfg: TrainCfg, spec: Any, device: torch.device, sample: torch.Tensor) -> LocalEngine:
    """Backbone on its own RNG stream, then the engine (which builds the aux nets on theirs)."""
    task = build_task(cfg, spec)
    kwargs = task.model_kwargs()
    if cfg.model.patch_size is not None:  # a ViT for this dataset's images (ModelCfg)
        kwargs |= {"patch_size": cfg.model.patch_size, "image_size": cfg.data.image_size or spec.size}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(cfg.run.seed, "backbone"))
        if is_import_path(cfg.model.name):
            backbone = user_backbone(cfg, task, sample)
        else:
            if cfg.method.cuts:
                raise ConfigError(
                    "method.cuts names submodules of your own model (model.name=package.module:function); for "
                    f"{cfg.model.name} use method.split or method.ends"
                )
            try:
                backbone = create_model(
                    cfg.model.name, in_channels=spec.channels, width=cfg.model.width, **kwargs, **cfg.model.kwargs
                )
            except (TypeError, ValueError) as e:  # a classifier asked for a scale, a patch that does not tile
                raise ConfigError(
                    f"model.name={cfg.model.name} cannot be built for the {task.kind} dataset {cfg.data.name} ({e})"
                ) from None
    return LocalEngine(
        backbone,
        cfg.method,
        task,
        cfg.optim,
        aux_seed=stream_seed(cfg.run.seed, "aux"),
        device=device,
        sample=sample,
        precision=cfg.run.precision,
        compile=cfg.run.compile,
        channels_last=cfg.model.channels_last,
    )


def dataset_kwargs(builder: Any, task: Task, cfg: TrainCfg) -> dict[str, int]:
    """``num_classes`` and ``in_channels`` of the dataset for a builder whose signature has them and whose
    ``model.kwargs`` does not set them (so ``model.name=pkg:resnet50`` fits CIFAR-10 without more keys)."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}
    spec = dataset_spec(cfg.data.name)
    given = {"num_classes": getattr(task, "num_classes", None), "in_channels": spec.channels}
    return {k: v for k, v in given.items() if k in params and k not in cfg.model.kwargs and v is not None}


def user_backbone(cfg: TrainCfg, task: Task, sample: torch.Tensor) -> UnitBackbone:
    """``model.name: package.module:function``: build the user's model with ``model.kwargs`` and capture it
    (``UnitBackbone.from_module``, cut at ``method.cuts``); a builder may also return a UnitBackbone itself."""
    name = cfg.model.name
    try:
        builder = import_builder(name)
        model = builder(**dataset_kwargs(builder, task, cfg), **cfg.model.kwargs)
    except TypeError as e:  # the builder's signature does not take model.kwargs
        raise ConfigError(f"model.name={name}: calling it with model.kwargs={cfg.model.kwargs} failed ({e})") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if isinstance(model, UnitBackbone):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name={name} returned {type(model).__name__}, not an nn.Module")
    try:
        backbone = UnitBackbone.from_module(model, sample[:2], cuts=cfg.method.cuts or None, output=cfg.model.output)
    except CaptureError as e:
        raise ConfigError(f"model.name={name}: {e}") from None
    width = backbone.infos[-1].channels
    expected = getattr(task, "num_classes", None)
    if expected is not None and width != expected:
        raise ConfigError(
            f"model.name={name} predicts {width} outputs but {cfg.data.name} has {expected} classes; "
            f"set the builder's class count (e.g. model.kwargs.num_classes={expected})"
        )
    return backbone


def resolve_time_balance(cfg: TrainCfg, spec: Any, device: torch.device, loader: Any, quiet: bool = True) -> TrainCfg:
    """``method.balance: time`` with ``split: auto``: measure per-unit and aux-net times once on a real batch and
    record the split as explicit ends, so the saved config, a resumed run and every pipeline rank use the same
    split (:mod:`.partition`). Other configs are returned unchanged."""
    if cfg.method.balance != "time" or cfg.method.split != "auto" or resolve_k(cfg.method) == 1:
        return cfg  # (one module: nothing to balance)
    batch = Batch(*next(iter(loader)))

    def build(method: MethodCfg) -> LocalEngine:
        return build_engine(replace(cfg, method=method), spec, device, batch.input)

    method, seconds = time_balanced_method(cfg.method, build, batch)
    if not quiet:
        ms = ", ".join(f"{1000 * s:.1f}" for s in seconds)
        print(f"method.balance=time: ends {method.ends}, measured ms per module (fwd+bwd+aux) [{ms}]", flush=True)
    return replace(cfg, method=method)


def run_name(cfg: TrainCfg) -> str:
    """``resnet32_dgl+cascade+pff_k16``: model, method with its add-ons, K."""
    method = "+".join([cfg.method.name, *cfg.method.addons])
    model = cfg.model.name.rpartition(":")[2]  # your own model: the builder's name
    return cfg.run.name or f"{model}_{method}_k{resolve_k(cfg.method)}"


def checkpoint_path(run: str | Path) -> Path:
    """A run directory's ``ckpt_last.pt``, or the checkpoint file itself."""
    path = Path(run)
    return path / "ckpt_last.pt" if path.is_dir() else path


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
) -> dict[str, Any]:
    """Train one run, or continue ``resume`` (a run directory or checkpoint) with the same data order and RNG
    state. When resuming without ``cfg``, ``overrides`` (``run.epochs=...``) apply to the saved config.
    Returns the last epoch's metrics and ``run_dir``."""
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

    # ---- data and model ------------------------------------------------------------------------------------
    train_loader, test_loader, spec = build_loaders(cfg, device)
    cfg = resolve_time_balance(cfg, spec, device, train_loader, quiet)
    sample = next(iter(test_loader))[0][: cfg.data.batch_size]
    engine = build_engine(cfg, spec, device, sample)
    epoch, step_in_epoch, global_step = 0, 0, 0
    if state is not None:
        engine.load_state_dict(state)
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["step"]
        torch.set_rng_state(state["rng_torch"])
    else:
        run_dir = new_run_dir(cfg.run.out, run_name(cfg))
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "env.json").write_text(json.dumps(environment(device), indent=2))
    log = MetricsLog(run_dir / "metrics.jsonl", cfg.log.tensorboard)

    def checkpoint(unrecorded_s: float = 0.0, unrecorded_steps: int = 0) -> None:
        """Save the run; ``unrecorded_*``: training seconds and steps since the last metrics record, kept with
        the engine's statistics of those steps, so an epoch continued after an interruption records all of its
        steps (loss, train accuracy, time), as the uninterrupted run does."""
        save_checkpoint(
            {
                **engine.state_dict(),
                "config": to_dict(cfg),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "step": global_step,
                "rng_torch": torch.get_rng_state(),
                "peak_act_bytes": peak_act,
                "unrecorded": {"seconds": unrecorded_s, "steps": unrecorded_steps, "stats": engine.stats.cpu()},
            },
            run_dir / "ckpt_last.pt",
        )

    # ---- training loop -------------------------------------------------------------------------------------
    steps_per_epoch = len(train_loader)
    meter = SavedTensorMeter()
    peak_act = state.get("peak_act_bytes", 0) if state else 0
    unrecorded: dict[str, Any] = {"seconds": 0.0, "steps": 0}  # steps since the last record
    if state and state.get("unrecorded"):  # (checkpoints from before they were kept have none)
        unrecorded = state["unrecorded"]
        engine.stats.copy_(unrecorded["stats"])
    result: dict[str, Any] = {"run_dir": str(run_dir), "ends": list(engine.ends)}
    if not quiet:
        print(
            f"run {run_dir}: {cfg.model.name}, {cfg.method.name} K={engine.k} split {engine.ends}, "
            f"{steps_per_epoch} steps/epoch on {device}"
        )
    stop = False
    while epoch < cfg.run.epochs and not stop:
        reset_cuda_peak(device)
        start = time.perf_counter() - unrecorded["seconds"]
        steps_this_epoch = unrecorded["steps"]
        unrecorded = {"seconds": 0.0, "steps": 0}
        bar = tqdm(
            train_loader.batches(epoch, step_in_epoch),
            total=steps_per_epoch,
            initial=step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.run.epochs}",
            disable=None if cfg.run.progress and not quiet else True,
            mininterval=1.0,
            leave=False,
        )
        for x, y, raw in bar:
            engine.set_lr(lr_at(cfg.optim, epoch, step_in_epoch, steps_per_epoch, cfg.run.epochs))
            measuring = global_step < METER_STEPS
            engine.meter = meter if measuring else None
            with meter if measuring else contextlib.nullcontext():
                engine.train_step(Batch(x, y, raw))
            step_in_epoch, global_step, steps_this_epoch = step_in_epoch + 1, global_step + 1, steps_this_epoch + 1
            if measuring:
                peak_act = max(peak_act, meter.peak)
            if cfg.run.ckpt_every and global_step % cfg.run.ckpt_every == 0:
                checkpoint(time.perf_counter() - start, steps_this_epoch)
            if cfg.run.max_steps and global_step >= cfg.run.max_steps:
                stop = True
                break
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - start
        stats = engine.pop_train_stats()
        epoch_done = step_in_epoch == steps_per_epoch
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": global_step,
            "lr": engine.optimizers[0].param_groups[0]["lr"],
            "train_loss": stats["train_loss"],
            f"train_{engine.task.headline}": stats["train_stat_sum"]
            / max(1, _seen(train_loader, epoch, step_in_epoch - steps_this_epoch, step_in_epoch)),
            "epoch_time_s": train_time,
            "imgs_per_s": _seen(train_loader, epoch, step_in_epoch - steps_this_epoch, step_in_epoch)
            / max(train_time, 1e-9),
            "peak_act_bytes": peak_act,
            "peak_mem_bytes": cuda_peak_bytes(device),
            "train_size": train_loader.n,
        }
        if epoch_done:
            epoch, step_in_epoch = epoch + 1, 0
        if epoch_done and (epoch % cfg.run.eval_every == 0 or epoch == cfg.run.epochs) or stop:
            record.update(engine.evaluate(test_loader.batches()))
        log.log(record)
        result.update(record)
        if not quiet:
            print(_row(record, engine.task.headline), flush=True)
        checkpoint()
    log.close()
    result["peak_act_bytes"] = peak_act
    return result


def _seen(loader: Any, epoch: int, first: int, last: int) -> int:
    """Samples in batches ``first..last-1`` of an epoch (the last batch may be short)."""
    return max(0, min(last * loader.batch_size, loader.n) - first * loader.batch_size)


def _row(r: dict[str, Any], metric: str = "acc") -> str:
    """One progress line; ``metric`` is the task's headline (``acc``, ``psnr``)."""
    losses = " ".join(f"{v:.3f}" for v in r["train_loss"])
    test = f"  test_{metric} {r[f'test_{metric}']:.4f}" if f"test_{metric}" in r else ""
    aux = ""
    if any(a is not None for a in r.get(f"aux_{metric}", [])):
        aux = f"  aux_{metric} " + " ".join("-" if a is None else f"{a:.3f}" for a in r[f"aux_{metric}"])
    train = r[f"train_{metric}"]  # NaN where the task has no per-batch training metric (detection mAP)
    train = "" if math.isnan(train) else f"  train_{metric} {train:.4f}"
    return (
        f"epoch {r['epoch']:3d}  step {r['step']:6d}  lr {r['lr']:.4f}  loss [{losses}]"
        f"{train}{test}{aux}  {r['imgs_per_s']:.0f} img/s  {r['epoch_time_s']:.1f}s"
    )
