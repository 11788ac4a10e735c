"""The single-process local-learning engine (spec methods.md §0.2, §10.2 ``SequentialLocalTrainer``).

Per batch, for each of the K modules: forward, the method's local loss, backward, then pass the *detached* output
on, so module k's graph is freed before module k+1 runs and no gradient crosses a module boundary. Each module
has its own optimizer (module + aux net parameters), stepped right after its backward (``step: module``, DGL) or
after the last backward (``step: end``, InfoPro reference); with SGD both give the same parameters.

The engine is the only place that calls ``backward``/``step``. It wraps any :class:`UnitBackbone`, including one
made from the user's own ``nn.Sequential``::

    backbone = UnitBackbone.from_sequential(my_layers, input_shape=(3, 32, 32))
    engine = LocalEngine(backbone, MethodCfg(name="dgl", k=3), ClassificationTask(10), OptimCfg(lr=0.05))
    for x, y in my_batches:
        engine.train_step(Batch(x, y))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..local.checkpointing import CheckpointedSequential, recomputed, segment_count
from ..local.split import backbone_layout, balanced_split, check_k, preset_split, validate_ends
from ..local.task import Batch, Task
from ..measure.memory import SavedTensorMeter
from ..measure.profile import unit_costs
from ..methods.base import LocalMethod, build_method, method_class, resolve_k
from ..methods.options import MethodCfg, MethodContext
from ..models.units import ModuleBackbone, UnitBackbone, backward_carry, carry_tensors, detach_carry, grad_leaves
from .config import OptimCfg
from .schedule import build_optimizer


def resolve_split(backbone: UnitBackbone, cfg: MethodCfg, sample: torch.Tensor | None = None) -> list[int]:
    """Exclusive end unit index of each local module, from ``method.split`` (see :mod:`locallearn.local.split`),
    ``method.cuts`` (submodule names of a captured model) or the cuts / k a captured backbone was built with."""
    n = len(backbone)
    if cfg.cuts:
        if not isinstance(backbone, ModuleBackbone):
            raise ValueError(
                "method.cuts names submodules of your own model (model.name=package.module:function, or "
                "UnitBackbone.from_module); for a zoo backbone use method.split or method.ends"
            )
        return _agree(backbone.ends_after(cfg.cuts), cfg, "method.cuts")
    if backbone.planned_ends is not None and cfg.split == "auto" and not cfg.ends:
        return _agree(list(backbone.planned_ends), cfg, "the backbone's cuts")
    if backbone.planned_k is not None:
        if cfg.k is not None and cfg.k != backbone.planned_k:
            raise ValueError(
                f"method.k={cfg.k} but the backbone was wrapped with k={backbone.planned_k}; make them agree"
            )
        cfg = replace(cfg, k=backbone.planned_k)
    k = resolve_k(cfg)
    check_k(k, n)
    if cfg.split == "ends":
        return _agree(validate_ends(cfg.ends, n), cfg, "method.ends")
    if cfg.ends:
        raise ValueError("method.ends is only used with method.split=ends")
    if cfg.split == "auto":
        if k == 1:  # one module (E2E): nothing to balance, whatever method.balance says
            return [n]
        if cfg.balance == "time":
            raise ValueError(
                "method.balance=time is measured before the engine is built (locallearn train/summary do it); in "
                "Python use locallearn.train.partition.time_balanced_method, or pass method.split=ends"
            )
        if cfg.balance in ("flops", "activations") and sample is None:
            raise ValueError(f"method.balance={cfg.balance} needs a sample input to measure the units")
        return balanced_split(unit_costs(list(backbone.units), sample, cfg.balance), k)
    # Presets are looked up by the backbone's layout (blocks per stage): CIFAR/ImageNet ResNets, ViT.
    return preset_split(cfg.split, backbone_layout(backbone.infos), k)


def _agree(ends: list[int], cfg: MethodCfg, source: str) -> list[int]:
    if cfg.k is not None and len(ends) != cfg.k:
        raise ValueError(f"{source} make {len(ends)} modules but method.k={cfg.k}; set method.k={len(ends)} (or null)")
    return ends


class LocalEngine:
    """K gradient-isolated modules of ``backbone``, the method's aux nets, one optimizer per module.

    Args:
        backbone: the network as ordered units (already initialised: the caller owns the backbone RNG stream).
        method_cfg: method, K and split.
        task: the task (loss of the last module and of task-head aux nets, metrics; :mod:`~locallearn.local.task`).
        optim: optimiser settings.
        aux_seed: seeds aux-net initialisation on its own stream, so the method never shifts the backbone's
            or the data's randomness.
        sample: one input batch (for FLOPs/activation-balanced splits).
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast (fp16 with one GradScaler for all K losses).
    """

    def __init__(
        self,
        backbone: UnitBackbone,
        method_cfg: MethodCfg,
        task: Task,
        optim: OptimCfg,
        *,
        aux_seed: int = 1,
        device: str | torch.device = "cpu",
        sample: torch.Tensor | None = None,
        precision: str = "fp32",
        compile: bool = False,
        channels_last: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.backbone, self.task = backbone, task
        self.ends = resolve_split(backbone, method_cfg, sample)
        backbone.configure_split(self.ends)
        starts = [0, *self.ends[:-1]]
        segments = [segment_count(method_cfg.checkpoint, e - s) for s, e in zip(starts, self.ends)]
        self.modules = [
            CheckpointedSequential(list(backbone.units[s:e]), n) if n > 1 else nn.Sequential(*backbone.units[s:e])
            for s, e, n in zip(starts, self.ends, segments)
        ]
        ctx = MethodContext(
            [backbone.infos[e - 1] for e in self.ends],
            backbone.num_stages,
            backbone.in_channels,
            task,
            list(backbone.units),
            list(backbone.infos),
            list(self.ends),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aux_seed)
            self.method: LocalMethod = build_method(method_cfg, ctx)
        self.step_mode = method_cfg.step or method_class(method_cfg.name).default_step
        self.cascade_recompute = method_cfg.cascade_recompute
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        for part in (backbone, self.method):
            part.to(device=self.device, memory_format=memory_format)
        if compile:  # in place, per module and per aux objective, so checkpoint keys stay clean (eng. §6)
            for module in self.modules:
                module.compile()
            for aux in self.method.aux:
                for objective in (aux.independent, aux.cascade) if aux is not None else ():
                    if objective is not None:
                        objective.outputs = torch.compile(objective.outputs)
        self.optimizers = [build_optimizer(self.module_parameters(k), optim) for k in range(self.k)]
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"run.precision must be fp32, bf16 or fp16, got {precision!r}")
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.meter: SavedTensorMeter | None = None
        # Per-module loss sums, the final head's train_stat sum, steps: on the device, read by pop_train_stats
        # (and by the pipeline runtime, which fills the entries of its own stage).
        self.stats = torch.zeros(self.k + 2, device=self.device)
        # Called with k right before module k's optimizer step; a data-parallel runtime (locallearn.parallel) sets
        # it to average module k's gradients across replicas. None in a single process.
        self.grad_sync: Callable[[int], None] | None = None

    @property
    def k(self) -> int:
        return len(self.modules)

    def module_parameters(self, k: int) -> list[nn.Parameter]:
        """Trainable parameters of module k and its aux net (EMA copies have requires_grad=False: never stepped,
        never decayed)."""
        aux = self.method.aux[k]
        params = list(self.modules[k].parameters()) + ([] if aux is None else list(aux.parameters()))
        return [p for p in params if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The ``run.precision`` autocast context for a module's forward and losses (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def step_module(self, k: int) -> None:
        """Step module k's optimizer (after ``grad_sync`` where a data-parallel runtime set one; via the
        GradScaler under fp16). Runtimes that schedule modules themselves (PPLL) call it per stage."""
        if self.grad_sync is not None:
            self.grad_sync(k)
        if self.scaler is None:
            self.optimizers[k].step()
        else:
            self.scaler.step(self.optimizers[k])

    def train_step(self, batch: Batch) -> None:
        """One local-learning step on ``batch``. Statistics stay on the device (no host sync per step).

        Each module runs forward once. A loss of reach r (a cascade) sends its gradient back through the r
        modules ending at this one and no further: the engine keeps the graphs of the last ``max_reach`` modules
        alive, each on its own leaf input, and carries the input gradient from graph to graph by hand
        (spec §10.1.5: one forward per module, not the reference's triple forward). Plain methods (reach 1)
        detach after every module, so at most one module's graph is alive.
        """
        self.backbone.train()
        self.method.train()
        span = self.method.max_reach
        # A module whose graph a later cascade still walks must not change its weights in place before that.
        at_end = self.step_mode == "end" or span > 1
        if at_end:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
        kept: list[tuple[Any, Any]] = []  # (leaf input, output) of modules whose graph lives (tensors or carries)
        kept_bytes: list[int] = []  # saved-activation bytes of those graphs (for the meter)
        h = batch.input
        for k in range(self.k):
            if not at_end:
                self.optimizers[k].zero_grad(set_to_none=True)
            x = detach_carry(h, span > 1 and k > 0)
            with self.autocast():
                out = self.forward_module(k, x)
                module_bytes = self.meter.current - sum(kept_bytes) if self.meter is not None else 0
                losses = self.method.local_losses(k, out, batch)
            for loss, reach in losses:
                if loss.requires_grad:
                    self.local_backward(loss, k, min(reach, k + 1), x, kept, span)
                self.stats[k] += loss.detach().float()
            # Under a cascade the backward retained the graphs (later hops walk module k's); the aux nets' part
            # is needed by no later hop: drop it now, not when the next module's losses replace these names.
            losses = loss = None
            self.method.after_backward(k)
            kept = [*kept, (x, out)][-(span - 1) :] if span > 1 else []
            if self.meter is not None:
                kept_bytes = [*kept_bytes, module_bytes][-(span - 1) :] if span > 1 else []
                self.meter.release(keep=sum(kept_bytes))
            if not at_end:
                self.step_module(k)
            h = out
        if at_end:
            for k in range(self.k):
                self.step_module(k)
        if self.scaler is not None:
            self.scaler.update()
        self.method.after_iteration()
        self.stats[-2] += self.task.train_stat(h.detach(), batch)
        self.stats[-1] += 1

    def forward_module(self, k: int, x: Any) -> Any:
        """Module k's training forward. Under a cascade (``max_reach > 1``) with ``method.cascade_recompute``, its
        graph keeps only the input and is rebuilt for each backward that walks it (its own losses, then the next
        module's cascade hop), so a module waiting for that hop holds its input, not its activations
        (:func:`~locallearn.local.checkpointing.recomputed`: BatchNorm moved once, random ops replayed)."""
        if self.cascade_recompute and self.method.max_reach > 1:
            return recomputed(self.modules[k], x)
        return self.modules[k](x)

    def local_backward(
        self,
        loss: torch.Tensor,
        k: int,
        reach: int,
        x: Any,
        kept: list[tuple[Any, Any]],
        span: int,
    ) -> None:
        """Backward of one loss into module k and its aux net, then through ``reach - 1`` earlier modules whose
        graphs are ``kept`` ((leaf input, output) pairs). ``x`` is module k's leaf input (a tensor, or a captured
        model's carry of tensors); ``span`` the method's longest reach (1: the input is detached and a plain
        backward suffices). Public for the pipeline runtime, which runs the same backward per stage."""
        scaled = loss if self.scaler is None else self.scaler.scale(loss)
        if span == 1:
            scaled.backward()  # the input is detached: nothing beyond module k can be reached
            return
        params = self.module_parameters(k)
        if reach == 1:
            torch.autograd.backward(scaled, inputs=params, retain_graph=True)
            return
        leaves = grad_leaves(x)
        torch.autograd.backward(scaled, inputs=[*params, *leaves], retain_graph=True)
        grads = self._take_grads(x)
        for hop in range(1, reach):
            prev_x, prev_out = kept[-hop]
            last = hop == reach - 1
            inputs = [p for p in self.modules[k - hop].parameters() if p.requires_grad]
            prev_leaves = [] if last else grad_leaves(prev_x)
            backward_carry(prev_out, grads, inputs=[*inputs, *prev_leaves], retain_graph=True)
            if not last:
                grads = self._take_grads(prev_x)

    @staticmethod
    def _take_grads(x: Any) -> list[torch.Tensor | None]:
        """The gradients gathered on a leaf input's tensors, cleared for the next backward."""
        grads = []
        for t in carry_tensors(x):
            grads.append(t.grad)
            t.grad = None
        return grads

    def pop_train_stats(self) -> dict[str, object]:
        """Mean loss per module and the sum of the final head's per-sample ``task.train_stat`` (top-1 hits for
        classification, PSNR for super-resolution) since the last call (one host sync)."""
        stats = self.stats.tolist()
        self.stats.zero_()
        steps = max(stats[-1], 1.0)
        return {"train_loss": [s / steps for s in stats[:-2]], "train_stat_sum": stats[-2]}

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, object]:
        """The final head's test metrics (``test_acc``; ``test_psnr``, ``test_ssim``) and loss, and the task's
        headline metric of every aux net that predicts the task (``aux_acc``, ``aux_psnr``: quality by depth)."""
        self.backbone.eval()
        self.method.eval()
        final = self.task.metrics()
        aux = [self.task.metrics() for _ in range(self.k - 1)]
        has_head = [False] * (self.k - 1)
        loss_sum, seen = torch.zeros((), device=self.device), 0
        for x, y, raw in batches:
            batch = Batch(x, y, raw)
            h = x
            with self.autocast():
                for k, module in enumerate(self.modules):
                    h = module(h)
                    prediction = self.method.aux_logits(k, h) if k < self.k - 1 else None
                    if prediction is not None:
                        has_head[k] = True
                        aux[k].update(prediction, batch)
                final.update(h, batch)
                loss_sum += self.task.loss(h, batch) * len(batch)
            seen += len(batch)
        name = self.task.headline
        return {
            **{f"test_{key}": value for key, value in final.compute().items()},
            "test_loss": loss_sum.item() / max(seen, 1),
            f"aux_{name}": [m.compute()[name] if ok else None for m, ok in zip(aux, has_head)],
        }

    def state_dict(self) -> dict[str, object]:
        return {
            "model": self.backbone.state_dict(),
            "aux": self.method.state_dict(),
            "optim": [opt.state_dict() for opt in self.optimizers],
            "ends": list(self.ends),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["ends"]) != self.ends:
            raise ValueError(f"checkpoint split {state['ends']} differs from this config's split {self.ends}")
        self.backbone.load_state_dict(state["model"])
        self.method.load_state_dict(state["aux"])
        for opt, s in zip(self.optimizers, state["optim"], strict=True):
            opt.load_state_dict(s)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
