"""The program's factory: a config becomes loaders, task, backbone and engine (what ``locallearn train`` builds
before the :class:`~locallearn.train.trainer.Trainer` runs it).

Seeds: the backbone, the aux nets and the data each have their own stream derived from ``run.seed``, so
switching method never changes the data order or the backbone's initial weights, and one seed gives one run
(bitwise on CPU).
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.datasets import dataset_spec, load_split
from ..data.loader import ResidentLoader
from ..data.sr import sr_loaders
from ..models.capture import CaptureError
from ..models.registry import create_model, import_builder, is_import_path
from ..models.units import UnitBackbone
from ..tasks.detection import DetectionTask
from ..tasks.language_model import LanguageModelTask
from ..tasks.task import Batch, ClassificationTask, SuperResolutionTask, Task
from .config import ConfigError, SplitCfg, TrainCfg
from .engine import LocalEngine
from .split import resolve_k, time_balanced_split


def stream_seed(seed: int, stream: str) -> int:
    """Independent seeds for the ``backbone``, ``aux`` and ``data`` streams of one run seed."""
    key = {"backbone": 0, "aux": 1, "data": 2}[stream]
    return int(np.random.SeedSequence([seed, key]).generate_state(1)[0])


def resolve_device(name: str) -> torch.device:
    """``run.device`` as a device. On CUDA, cuDNN's autotuner is switched on: every step has the same shapes (the
    ragged last batch costs one extra search), so each convolution gets its fastest algorithm."""
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device={name} is not a device name; use cpu, cuda, cuda:N or auto") from None
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
        if limit and limit > len(images):
            key = "data.limit_train" if train else "data.limit_test"
            raise ConfigError(
                f"{key}={limit} but {cfg.data.name} has {len(images)} {split} samples; use at most {len(images)} "
                "or leave it unset for all of them"
            )
        if limit:
            images, labels = images[:limit], labels[:limit]
        if train and cfg.data.batch_size > len(images):
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} is larger than the {len(images)} training samples; "
                f"use at most {len(images)}"
            )
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
    """The dataset's task: classification with its class count, super-resolution by ``data.scale``, detection, or
    language modelling over the dataset's vocabulary."""
    if spec.task == "super_resolution":
        return SuperResolutionTask(cfg.data.scale)
    if spec.task == "detection":
        return DetectionTask(list(spec.classes))
    if spec.task == "language_model":
        return LanguageModelTask(spec.num_classes)
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
            if cfg.model.leaf_modules:
                raise ConfigError(
                    f"model.leaf_modules applies to your own model (model.name=package.module:function), not to "
                    f"{cfg.model.name}; unset it"
                )
            if cfg.split.cuts:
                raise ConfigError(
                    "split.cuts names submodules of your own model (model.name=package.module:function); for "
                    f"{cfg.model.name} use split.preset or split.ends"
                )
            try:
                backbone = create_model(
                    cfg.model.name, in_channels=spec.channels, width=cfg.model.width, **kwargs, **cfg.model.kwargs
                )
            except (TypeError, ValueError) as e:  # a classifier asked for a scale, a patch that does not tile
                raise ConfigError(
                    f"model.name={cfg.model.name} cannot be built for the {task.kind} dataset {cfg.data.name} ({e})"
                ) from None
    return make_engine(cfg, backbone, task, device, sample)


def make_engine(cfg: TrainCfg, backbone: UnitBackbone, task: Task, device: torch.device, sample: Any) -> LocalEngine:
    """The engine of ``cfg`` on a built ``backbone`` (the aux nets on their own RNG stream)."""
    return LocalEngine(
        backbone,
        cfg.method,
        task,
        cfg.optim,
        split=cfg.split,
        aux_seed=stream_seed(cfg.run.seed, "aux"),
        device=device,
        sample=sample,
        precision=cfg.run.precision,
        compile=cfg.run.compile and cfg.run.compile_backend,
        channels_last=cfg.model.channels_last,
    )


def engine_from_model(
    cfg: TrainCfg, model: nn.Module, task: Task | None, device: torch.device, sample: torch.Tensor
) -> LocalEngine:
    """Your own model, as it is: an ``nn.Module`` captured and cut at ``split.cuts`` (or balanced into
    ``split.k`` modules), or a UnitBackbone. Its weights are yours (no re-initialisation); ``task`` defaults to
    classification over the model's output width."""
    if cfg.split.balance == "time" and cfg.split.preset == "auto" and resolve_k(cfg.split, cfg.method.name) > 1:
        raise ConfigError(
            "split.balance=time is measured from a config's model; with your own model pass split.cuts, split.k "
            "with another balance, or split.preset=ends with split.ends"
        )
    backbone = capture_model(cfg, model, sample)
    return make_engine(cfg, backbone, task or ClassificationTask(backbone.infos[-1].channels), device, sample)


def capture_model(cfg: TrainCfg, model: nn.Module, sample: torch.Tensor, context: str = "") -> UnitBackbone:
    """``model`` as units, cut by ``split.cuts`` with ``model.output`` and ``model.leaf_modules`` (a UnitBackbone
    as it is); a capture that fails is one ConfigError, prefixed by ``context``."""
    if isinstance(model, UnitBackbone):
        return model
    try:
        return UnitBackbone.from_module(
            model,
            sample[:2],
            cuts=cfg.split.cuts or None,
            output=cfg.model.output,
            leaf_modules=cfg.model.leaf_modules,
        )
    except CaptureError as e:
        raise ConfigError(f"{context}{e}") from None


def dataset_kwargs(builder: Any, task: Task, cfg: TrainCfg) -> dict[str, int]:
    """``num_classes`` and ``in_channels`` of the dataset for a builder whose signature has them and whose
    ``model.kwargs`` does not set them (so ``model.name=pkg:resnet50`` fits CIFAR-10 without more keys)."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}
    spec = dataset_spec(cfg.data.name)
    given = {"num_classes": task.model_kwargs().get("num_classes"), "in_channels": spec.channels}
    return {k: v for k, v in given.items() if k in params and k not in cfg.model.kwargs and v is not None}


def user_backbone(cfg: TrainCfg, task: Task, sample: torch.Tensor) -> UnitBackbone:
    """``model.name: package.module:function``: build the user's model with ``model.kwargs`` and capture it
    (``UnitBackbone.from_module``, cut at ``split.cuts``); a builder may also return a UnitBackbone itself."""
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
    backbone = capture_model(cfg, model, sample, f"model.name={name}: ")
    width = backbone.infos[-1].channels
    expected = task.model_kwargs().get("num_classes")  # (a language model's: its vocabulary)
    if expected is not None and width != expected:
        raise ConfigError(
            f"model.name={name} predicts {width} outputs but {cfg.data.name} has {expected} classes; "
            f"set the builder's class count (e.g. model.kwargs.num_classes={expected})"
        )
    return backbone


def resolve_time_balance(cfg: TrainCfg, spec: Any, device: torch.device, loader: Any, quiet: bool = True) -> TrainCfg:
    """``split.balance: time`` with ``split.preset: auto``: measure per-unit and aux-net times once on a real batch
    and record the split as explicit ends, so the saved config, a resumed run and every pipeline rank use the same
    split (:func:`.split.time_balanced_split`). Other configs are returned unchanged."""
    if cfg.split.balance != "time" or cfg.split.preset != "auto" or resolve_k(cfg.split, cfg.method.name) == 1:
        return cfg  # (one module: nothing to balance)
    batch = Batch(*next(iter(loader)))

    def build(split: SplitCfg) -> LocalEngine:
        return build_engine(replace(cfg, split=split), spec, device, batch.input)

    split, seconds = time_balanced_split(cfg.split, cfg.method.name, build, batch)
    if not quiet:
        ms = ", ".join(f"{1000 * s:.1f}" for s in seconds)
        print(f"split.balance=time: ends {split.ends}, measured ms per module (fwd+bwd+aux) [{ms}]", flush=True)
    return replace(cfg, split=split)


def run_name(cfg: TrainCfg) -> str:
    """``run.name`` as given, else ``resnet32_dgl+cascade+pff_k16`` (model, method with its add-ons, K), with
    ``_ppll`` / ``_dp`` for a multi-process run. The run folder adds the date and time in front."""
    if cfg.run.name:
        return cfg.run.name
    method = "+".join([cfg.method.name, *cfg.method.addons])
    model = cfg.model.name.rpartition(":")[2]  # your own model: the builder's name
    runtime = "" if cfg.parallel == "none" else f"_{cfg.parallel}"
    return f"{model}_{method}_k{resolve_k(cfg.split, cfg.method.name)}{runtime}"
