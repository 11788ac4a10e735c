"""The single-process local-learning engine: the reference step of InfoPro's and DGL's code (docs/api.md).

Per batch, for each of the K modules: forward, the method's local loss, backward, then pass the *detached* output
on, so module k's graph is freed before module k+1 runs and no gradient crosses a module boundary. Each module
has its own optimizer (module + aux net parameters), stepped right after its backward (``step: module``, DGL) or
after the last backward (``step: end``, InfoPro reference); with SGD both give the same parameters.

The engine is the only place that calls ``backward``/``step``. It wraps any :class:`UnitBackbone`, including one
made from the user's own ``nn.Sequential``::

    backbone = UnitBackbone.from_sequential(my_layers, input_shape=(3, 32, 32))
    engine = LocalEngine(backbone, MethodCfg(name="dgl"), ClassificationTask(10), OptimCfg(lr=0.05), split=3)
    for x, y in my_batches:
        engine.train_step(Batch(x, y))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..local.checkpointing import CheckpointedSequential, recomputed, segment_count
from ..measure.memory import SavedTensorMeter
from ..methods.base import LocalMethod, build_method, method_class
from ..methods.options import MethodCfg, MethodContext
from ..models.units import UnitBackbone, backward_carry, carry_tensors, detach_carry, grad_leaves
from ..names import unknown_name
from ..tasks.task import Batch, Task
from .config import OptimCfg, SplitCfg
from .schedule import build_optimizer
from .split import resolve_split


@dataclass
class StepResult:
    """What one :meth:`LocalEngine.train_step` returns, on the device (reading it syncs the host).

    ``figures`` holds K + 2 numbers: the summed local losses of each module the step ran (0 for the others), the
    final head's ``task.train_stat`` summed over the batch (0 unless the step ran the last module), and 1 (the
    step count), so a trainer accumulates steps with one addition; ``output`` is the last module's detached output.
    """

    figures: torch.Tensor
    output: Any

    def losses(self) -> list[float]:
        return self.figures[:-2].tolist()


class StepHooks(Protocol):
    """Where a runtime that runs one module per process joins :meth:`LocalEngine.train_step` (PPLL's stages,
    docs/pipeline.md): every call happens in this order, once per module (``stepped`` once per step)."""

    def forwarded(self, k: int, out: Any) -> None:
        """After module k's forward, before its losses (early forwarding: send the output downstream now)."""

    def backward(self, k: int, losses: list[tuple[torch.Tensor, int]], x: Any) -> bool:
        """Backpropagate module k's losses itself (a cascade whose reach crosses processes); False: the engine
        does."""

    def backwarded(self, k: int) -> None:
        """After module k's own backward, before the method's ``after_backward`` (EMA updates)."""

    def settled(self, k: int, x: Any, out: Any) -> None:
        """After ``after_backward``, before module k's optimizer step (gradients from later modules' cascades)."""

    def stepped(self) -> None:
        """After the optimizer steps and the GradScaler's update, before the method's ``after_iteration``."""


def compile_backend(compile: bool | str | Callable[..., Any]) -> str | Callable[..., Any] | None:
    """The ``torch.compile`` backend ``compile`` asks for (None: eager); an unknown name is a one-line error."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str) and compile not in torch.compiler.list_backends(exclude_tags=()):
        usual = sorted({*torch.compiler.list_backends(), "aot_eager", "eager"})  # not torch's debugging backends
        raise ValueError(unknown_name("torch.compile backend", compile, usual))
    return compile


class LocalEngine:
    """K gradient-isolated modules of ``backbone``, the method's aux nets, one optimizer per module.

    Args:
        backbone: the network as ordered units (already initialised: the caller owns the backbone RNG stream).
        method_cfg: the method and its add-ons.
        task: the task (loss of the last module and of task-head aux nets, metrics; :mod:`~locallearn.tasks.task`).
        optim: optimiser settings.
        split: where the modules end (:class:`~locallearn.train.config.SplitCfg`, or just K; None = the backbone's
            cuts or the method's default K, balanced by units; :mod:`locallearn.train.split`).
        aux_seed: seeds aux-net initialisation on its own stream, so the method never shifts the backbone's
            or the data's randomness.
        sample: one input batch (for FLOPs/activation-balanced splits).
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast (fp16 with one GradScaler for all K losses).
        compile: ``torch.compile`` every module and aux objective in place: True (inductor), a backend name
            (``aot_eager``, ``cudagraphs``, ...) or a backend callable (docs/configuration.md, ``run.compile``).
    """

    def __init__(
        self,
        backbone: UnitBackbone,
        method_cfg: MethodCfg,
        task: Task,
        optim: OptimCfg,
        *,
        split: SplitCfg | int | None = None,
        aux_seed: int = 1,
        device: str | torch.device = "cpu",
        sample: torch.Tensor | None = None,
        precision: str = "fp32",
        compile: bool | str | Callable[..., Any] = False,
        channels_last: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.backbone, self.task = backbone, task
        split = SplitCfg(k=split) if isinstance(split, int) else split or SplitCfg()
        self.ends = resolve_split(backbone, split, method_cfg.name, sample)
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
            split.preset,
            backbone.weight_init,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aux_seed)
            self.method: LocalMethod = build_method(method_cfg, ctx)
        self.step_mode = method_cfg.step or method_class(method_cfg.name).default_step
        self.cascade_recompute = method_cfg.cascade_recompute
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        for part in (backbone, self.method):
            part.to(device=self.device, memory_format=memory_format)
        backend = compile_backend(compile)
        if backend is not None:  # in place, per module and aux objective: checkpoint keys stay clean (no _orig_mod.)
            for module in self.modules:
                module.compile(backend=backend, dynamic=False)
            for aux in self.method.aux:
                for objective in (aux.independent, aux.cascade) if aux is not None else ():
                    if objective is not None:
                        objective.outputs = torch.compile(objective.outputs, backend=backend, dynamic=False)
        self._optimizers = [build_optimizer(self.module_parameters(k), optim) for k in range(self.k)]
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"run.precision must be fp32, bf16 or fp16, got {precision!r}")
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self._scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.meter: SavedTensorMeter | None = None
        self.checked = False  # the task has seen a batch's targets
        # Called with k right before module k's optimizer step; a data-parallel runtime (locallearn.parallel) sets
        # it to average module k's gradients across replicas. None in a single process.
        self.grad_sync: Callable[[int], None] | None = None

    @property
    def k(self) -> int:
        return len(self.modules)

    def module_parameters(self, k: int, aux: bool = True) -> list[nn.Parameter]:
        """Trainable parameters of module k and (``aux``) its aux net (EMA copies have requires_grad=False: never
        stepped, never decayed)."""
        head = self.method.aux[k] if aux else None
        params = list(self.modules[k].parameters()) + ([] if head is None else list(head.parameters()))
        return [p for p in params if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The ``run.precision`` autocast context for a module's forward and losses (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_lr(self, lr: float) -> None:
        for opt in self._optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    @property
    def lr(self) -> float:
        """The learning rate now set (every module shares the schedule)."""
        return self._optimizers[0].param_groups[0]["lr"]

    def zero_grad(self, k: int) -> None:
        """Free module k's (and its aux net's) gradients."""
        self._optimizers[k].zero_grad(set_to_none=True)

    def step_module(self, k: int) -> None:
        """Step module k's optimizer (after ``grad_sync`` where a data-parallel runtime set one; via the
        GradScaler under fp16). Public for the pipeline baselines, which schedule their own backward."""
        if self.grad_sync is not None:
            self.grad_sync(k)
        if self._scaler is None:
            self._optimizers[k].step()
        else:
            self._scaler.step(self._optimizers[k])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` as it is backpropagated: multiplied by the GradScaler's scale under fp16, else itself."""
        return loss if self._scaler is None else self._scaler.scale(loss)

    @property
    def scales_loss(self) -> bool:
        """Does backward run on a loss-scaled value (``run.precision=fp16``)?"""
        return self._scaler is not None

    def optimizer_tensors(self, modules: range | None = None) -> list[torch.Tensor]:
        """The optimizer state of ``modules`` (default: all): momentum buffers and the like, for memory reports."""
        modules = range(self.k) if modules is None else modules
        return [
            v for k in modules for s in self._optimizers[k].state.values() for v in s.values() if torch.is_tensor(v)
        ]

    def train_step(
        self,
        batch: Batch,
        *,
        modules: range | None = None,
        x: Any = None,
        hooks: StepHooks | None = None,
    ) -> StepResult:
        """One local-learning step on ``batch`` for ``modules`` (default: all K; a PPLL stage runs its own one, fed
        ``x``, the upstream output). Returns the step's figures on the device (no host sync per step).

        Each module runs forward once. A loss of reach r (a cascade) sends its gradient back through the r
        modules ending at this one and no further: the engine keeps the graphs of the last ``max_reach`` modules
        alive, each on its own leaf input, and carries the input gradient from graph to graph by hand (one
        forward per module, not the reference code's repeated forwards; docs/methods.md, "Add-ons: MAN, MAN++,
        HPFF, MLAAN on any base"). Plain methods (reach 1) detach after every module, so at most one module's graph
        is alive. ``hooks`` are where a multi-process runtime exchanges messages (:class:`StepHooks`); this is the
        only place that calls backward, the GradScaler and the optimizers' steps.
        """
        modules = range(self.k) if modules is None else modules
        if not self.checked:  # one host sync, on the first step only
            self.task.check(batch)
            self.checked = True
        self.backbone.train()
        self.method.train()
        span = self.method.max_reach
        # A module whose graph a later cascade still walks must not change its weights in place before that.
        at_end = self.step_mode == "end" or span > 1
        if at_end:
            for k in modules:
                self.zero_grad(k)
        figures = torch.zeros(self.k + 2, device=self.device)
        kept: list[tuple[Any, Any]] = []  # (leaf input, output) of modules whose graph lives (tensors or carries)
        kept_bytes: list[int] = []  # saved-activation bytes of those graphs (for the meter)
        h = batch.input if x is None else x
        for k in modules:
            if not at_end:
                self.zero_grad(k)
            x = detach_carry(h, span > 1 and k > 0)
            with self.autocast():
                out = self.forward_module(k, x)
                if hooks is not None:
                    hooks.forwarded(k, out)
                module_bytes = self.meter.current - sum(kept_bytes) if self.meter is not None else 0
                losses = self.method.local_losses(k, out, batch)
            for loss, _ in losses:
                figures[k] += loss.detach().float()
            if hooks is None or not hooks.backward(k, losses, x):
                for loss, reach in losses:
                    if loss.requires_grad:  # (a cascade's reach is cut where this range starts: a timing probe)
                        self.local_backward(loss, k, min(reach, len(kept) + 1), x, kept, span)
            # Under a cascade the backward retained the graphs (later hops walk module k's); the aux nets' part
            # is needed by no later hop: drop it now, not when the next module's losses replace these names.
            losses = loss = None
            if hooks is not None:
                hooks.backwarded(k)
            self.method.after_backward(k)
            if hooks is not None:
                hooks.settled(k, x, out)
            kept = [*kept, (x, out)][-(span - 1) :] if span > 1 else []
            if self.meter is not None:
                kept_bytes = [*kept_bytes, module_bytes][-(span - 1) :] if span > 1 else []
                self.meter.release(keep=sum(kept_bytes))
            if not at_end:
                self.step_module(k)
            h = out
        if at_end:
            for k in modules:
                self.step_module(k)
        if self._scaler is not None:
            self._scaler.update()
        if hooks is not None:
            hooks.stepped()
        self.method.after_iteration()
        output = detach_carry(h)
        if modules[-1] == self.k - 1:  # the final head's training metric (top-1 hits, PSNR), summed per sample
            figures[-2] += self.task.train_stat(output, batch)
        figures[-1] += 1
        return StepResult(figures, output)

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
        scaled = self.scale(loss)
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

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Any]) -> dict[str, object]:
        """The final head's test metrics (``test_acc``; ``test_psnr``, ``test_ssim``) and loss, and the task's
        headline metric of every aux net that predicts the task (``aux_acc``, ``aux_psnr``: quality by depth).
        ``batches``: any iterable of ``(input, target)``, ``(input, target, raw)`` or :class:`Batch` (a
        ``DataLoader`` as it is), moved to the engine's device."""
        self.backbone.eval()
        self.method.eval()
        final = self.task.metrics()
        aux = [self.task.metrics() for _ in range(self.k - 1)]
        has_head = [False] * (self.k - 1)
        loss_sum, seen = torch.zeros((), device=self.device), 0
        for item in batches:
            batch = Batch.of(item, self.device)
            h = batch.input
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
            "optim": [opt.state_dict() for opt in self._optimizers],
            "ends": list(self.ends),
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }

    def stage_state_dict(self, k: int) -> dict[str, object]:
        """Module k's share of :meth:`state_dict`: what a PPLL stage checkpoints."""
        aux = self.method.aux[k]
        return {
            "model": self.modules[k].state_dict(),
            "aux": aux.state_dict() if aux is not None else {},
            "optim": self._optimizers[k].state_dict(),
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }

    def load_stage_state_dict(self, k: int, state: dict, weights_only: bool = False) -> None:
        """Restore module k from :meth:`stage_state_dict`; ``weights_only``: the module and aux net, not the
        optimizer (evaluating a PPLL run in one process)."""
        self.modules[k].load_state_dict(state["model"])
        if self.method.aux[k] is not None:
            self.method.aux[k].load_state_dict(state["aux"])
        if weights_only:
            return
        self._optimizers[k].load_state_dict(state["optim"])
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])

    def load_state_dict(self, state: dict) -> None:
        if list(state["ends"]) != self.ends:
            raise ValueError(f"checkpoint split {state['ends']} differs from this config's split {self.ends}")
        self.backbone.load_state_dict(state["model"])
        self.method.load_state_dict(state["aux"])
        for opt, s in zip(self._optimizers, state["optim"], strict=True):
            opt.load_state_dict(s)
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
