"""Memory and FLOPs of a training step without allocating it: the engine built on the ``meta`` device.

On ``meta`` every tensor has a shape, a dtype and a storage identity but no data, so the very code that trains
(the backbone, the method's aux nets, add-ons, checkpointing, the engine's step) runs in milliseconds and a few
MiB whatever the batch and resolution, and the saved-tensor meter counts exactly what it counts on a real device
(tested byte for byte for every method and add-on). That is what ``locallearn summary`` prints for any preset,
ImageNet ResNet-152 at batch 1024 included, on a laptop.

What it gives, per local module and in total: parameter, gradient and optimizer-state bytes (for the configured
optimizer, after one step), the saved activations of the backbone module and of its aux net (EMA copies and
bridges included), the saved-activation peak of a whole training step for the method, and forward and training
FLOPs. The allocator-level peak (temporaries, gradients in flight) is measured by ``bench memory``, not
estimated here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.datasets import dataset_spec
from ..local.split import module_sizes
from ..measure.memory import SavedTensorMeter, frozen_param_bytes, model_state_bytes
from ..measure.profile import count_params
from ..models.units import detach_carry
from ..tasks.task import Batch
from .build import build_engine
from .config import TrainCfg
from .engine import LocalEngine

META = torch.device("meta")
META_BOXES = 8  # boxes per image in a detection estimate (see meta_batch)


@dataclass
class ModuleEstimate:
    units: str
    params: int
    fwd_flops: int
    act_bytes: int
    aux_params: int
    aux_fwd_flops: int
    aux_act_bytes: int


@dataclass
class StepEstimate:
    """One training step of ``cfg``: per-module figures, the step's saved-activation peak, state bytes, FLOPs."""

    modules: list[ModuleEstimate] = field(default_factory=list)
    step_act_peak: int = 0
    state: dict[str, int] = field(default_factory=dict)
    train_flops: int = 0
    ends: list[int] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())


def meta_batch(cfg: TrainCfg) -> Batch:
    """A training batch of the config's shape on ``meta`` (channels_last as the loaders give it): images of the
    dataset's size (class folders, detection: ``data.image_size``), for super-resolution LR patches of
    ``patch_size / scale`` with their HR targets, for detection padded box targets. The number of boxes per image
    sizes only the assignment, which runs without autograd, so it changes no saved activation and any count
    stands for the data's (``META_BOXES``). For text, token ids of ``data.seq_len``."""
    spec = dataset_spec(cfg.data.name)
    if spec.task == "language_model":  # token ids and the next-token targets, (B, seq_len) each
        tokens = torch.empty(cfg.data.batch_size, cfg.data.seq_len, dtype=torch.long, device=META)
        return Batch(tokens, torch.empty_like(tokens))
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    lr_side = hr_side = cfg.data.image_size or spec.size
    if spec.task == "super_resolution":
        lr_side, hr_side = cfg.data.patch_size // cfg.data.scale, cfg.data.patch_size
    shape = (cfg.data.batch_size, spec.channels, lr_side, lr_side)
    x = torch.empty(shape, device=META).contiguous(memory_format=memory_format)
    if spec.task == "super_resolution":
        target = torch.empty(shape[0], spec.channels, hr_side, hr_side, device=META)
    elif spec.task == "detection":
        target = torch.empty(shape[0], META_BOXES, 5, device=META)
    else:
        target = torch.empty(shape[0], dtype=torch.long, device=META)
    return Batch(x, target, torch.empty(shape, dtype=torch.uint8, device=META))


def meta_engine(cfg: TrainCfg, batch: Batch) -> LocalEngine:
    """``cfg``'s engine with every parameter, buffer and optimizer state on ``meta`` (nothing allocated)."""
    with torch.device(META):
        return build_engine(cfg, dataset_spec(cfg.data.name), META, batch.input)


def estimate_step(cfg: TrainCfg) -> StepEstimate:
    """Per-module and whole-step estimates of ``cfg`` (see the module docstring)."""
    batch = meta_batch(cfg)
    engine = meta_engine(cfg, batch)
    est = StepEstimate(ends=list(engine.ends))
    # A twin for the whole step, copied before any forward: the step changes BN statistics and creates optimizer
    # state.
    twin = copy.deepcopy(engine)
    engine.backbone.train()
    engine.method.train()
    starts, h = [0, *engine.ends[:-1]], batch.input
    for k, (module, size) in enumerate(zip(engine.modules, module_sizes(engine.ends))):
        names = f"{engine.backbone.infos[starts[k]].name}..{engine.backbone.infos[engine.ends[k] - 1].name}"
        with FlopCounterMode(display=False) as flops, SavedTensorMeter() as meter:
            out = module(detach_carry(h))
        aux, aux_flops, aux_act = engine.method.aux[k], 0, 0
        if aux is not None:
            z = detach_carry(out, requires_grad=True)
            with FlopCounterMode(display=False) as c, SavedTensorMeter() as aux_meter:
                engine.method.local_loss(k, z, batch)
            aux_flops, aux_act = int(c.get_total_flops()), aux_meter.peak
        est.modules.append(
            ModuleEstimate(
                f"{size} ({names})",
                count_params(module),
                int(flops.get_total_flops()),
                meter.peak,
                count_params(aux),
                aux_flops,
                aux_act,
            )
        )
        h = detach_carry(out)
    twin.meter = meter = SavedTensorMeter()
    with FlopCounterMode(display=False) as step_flops, meter:
        twin.train_step(batch)
    est.step_act_peak, est.train_flops = meter.peak, int(step_flops.get_total_flops())
    params = [p for k in range(twin.k) for p in twin.module_parameters(k)]
    est.state = model_state_bytes(params, twin.optimizer_tensors())
    est.state["frozen_param_bytes"] = frozen_param_bytes(twin.method)
    return est


def as_dict(est: StepEstimate) -> dict[str, Any]:
    return {
        "ends": est.ends,
        "modules": [m.__dict__ for m in est.modules],
        "step_act_peak_bytes": est.step_act_peak,
        **est.state,
        "train_flops": est.train_flops,
    }
