"""Add-ons whose state crosses a PPLL stage boundary (docs/pipeline.md, "Add-ons across stages"; the add-ons
themselves: docs/methods.md, "Add-ons: MAN, MAN++, HPFF, MLAAN on any base").

**EMA shipping (MAN, MAN++, LAM).** Module k's momentum bridge keeps EMA twins of *later* units
(:class:`~locallearn.methods.bridge.MomentumBridge`), which live on a later stage s. Every rank builds the whole
backbone, so rank k holds a replica of those units that it never trains; stage s ships their current parameters
into that replica, where the unchanged bridge code reads them (``bridge.live``). Rules, with N = ``ppll.ema_every``:

* stage s sends ``WEIGHTS`` of version v (its parameters after v optimizer steps) right after the step that
  produced them, whenever v is a multiple of N (a non-blocking send; one flattened tensor per receiving stage);
* the EMA update of stage k at step t reads version ``N·⌊(t + o)/N⌋``, o = 0 for ``ema_update: after_backward``
  (and ``legacy: ema_before_backward``), o = 1 for ``after_step``; stage k receives it just before that update
  (before its local loss, after its local backward, or after its optimizer step respectively) and applies it
  before the EMA ``lerp_``. Version 0 is the initial weights, identical on every rank.

The sequential engine's EMA at step t reads the source after t (after_backward: the next module has not stepped
yet) or t + 1 (after_step) steps, so **N = 1 is exactly the single-process semantics** (bitwise on CPU, tested);
N > 1 holds the source weights for N steps (a staleness of at most N − 1 steps, tested against the sequential
engine with the same held copies). At every checkpoint and at the end of the run a stage receives every version
already sent, and the checkpoint keeps the replica and its version, so a resumed run continues bitwise.
Cost: after_backward with N = 1 needs stage s to have finished step t−1 when stage k finishes the backward of
step t, which balanced stages usually have (no wait); after_step makes stage k wait each step for stage s's step t
(about one forward of stage s). N > 1 waits and sends only every N steps.

**Cascades across stages (HiLo, MLM; one-hop gradient messages).** A cascade loss of span r on stage j must reach
modules j−r+1..j. Stage j backpropagates it into its own parameters *and* its leaf input, and sends
d(loss)/d(input) (``GRAD``, stamped with the step, the origin j and the modules it still reaches) to stage j−1,
which backpropagates it through its retained graph of the same step and, when the reach goes on, relays its own
input gradient one hop further. Every stage i therefore receives, per step, exactly one message per origin
j = i+1..min(i+S−1, K−1) (S = the longest span), in order of j; ``NOGRAD`` stands for an origin without a cascade
gradient that step, so the count never depends on the data. Stage i keeps its graph of step t until those messages
have arrived, then steps (the sequential engine also steps every module after all cascade backwards), so each
module's gradient is the sequential engine's sum, accumulated in the same order (own losses, then origins i+1,
i+2, ...): **bitwise equal to sequential local learning** (tested for DGL and InfoPro, K = 2 and 3, spans 2 and
3). The price is a backward dependency: stage i cannot start step t+1 before stage i+S−1 has computed its loss of
step t, so cascades pipeline less well than plain local learning.
"""

from __future__ import annotations

from typing import Any

import torch

from ..methods.bridge import MomentumBridge
from ..models.units import carry_tensors, grad_leaves
from ..train.config import ConfigError
from ..train.engine import LocalEngine
from .link import GRAD, NOGRAD, WEIGHTS, Link, StageError


def check_supported(engine: LocalEngine) -> None:
    """Refuse, with one line, what PPLL cannot run faithfully."""
    cfg = engine.method.cfg
    reads = engine.backbone.cross_module_reads(engine.ends)
    if reads:
        raise ConfigError(
            f"PPLL cannot split this backbone at {engine.ends}: a later stage reads {', '.join(reads)} from an earlier "
            "one, which cannot cross processes (a detector's FPN tap, or a non-tensor value of your model such as a "
            "size read early and used late); choose other cuts or train without parallel=ppll"
        )
    if engine.method.name == "glcan" and cfg.glcan_global == "ema":
        raise ConfigError(
            "PPLL cannot run GLCAN's shared EMA head (every stage would follow the last stage's head); "
            "use method.glcan_global=per_module or train without parallel=ppll"
        )
    if "last_ema_only" in cfg.legacy and any(_bridges(engine, k) for k in range(engine.k)):
        raise ConfigError(
            "PPLL cannot run legacy last_ema_only (the last stage would update the previous stage's EMA); "
            "drop it from method.legacy or train without parallel=ppll"
        )
    if engine.method.max_reach > 1 and engine.scales_loss:
        raise ConfigError(
            "PPLL cascades send loss-scaled gradients between stages that each own a GradScaler; "
            "use run.precision=bf16 or fp32 with cascades"
        )


def _bridges(engine: LocalEngine, k: int) -> list[MomentumBridge]:
    aux = engine.method.aux[k]
    return [] if aux is None else [m for m in aux.modules() if isinstance(m, MomentumBridge)]


def _owner(ends: list[int], unit: int) -> int:
    return next(s for s, end in enumerate(ends) if unit < end)


def ema_needs(engine: LocalEngine, k: int) -> dict[int, list[int]]:
    """Units (by index) whose live weights stage k's EMA twins read, grouped by the stage that trains them."""
    needs: dict[int, set[int]] = {}
    for bridge in _bridges(engine, k):
        for unit in bridge.sources[: len(bridge.ema)]:
            owner = _owner(engine.ends, unit)
            if owner != k:
                needs.setdefault(owner, set()).add(unit)
    return {s: sorted(units) for s, units in sorted(needs.items())}


class WeightShipping:
    """EMA shipping for one stage: what it sends to earlier stages and receives from later ones (module doc)."""

    def __init__(self, engine: LocalEngine, link: Link, every: int) -> None:
        if every < 1:
            raise ConfigError(f"ppll.ema_every must be >= 1, got {every}")
        cfg, k = engine.method.cfg, link.stage
        self.units, self.link, self.every = engine.backbone.units, link, every
        self.needs = ema_needs(engine, k)
        self.gives = {r: units for r in range(k) for s, units in ema_needs(engine, r).items() if s == k}
        self.offset = 1 if cfg.ema_update == "after_step" and "ema_before_backward" not in cfg.legacy else 0
        self.point = "loss" if "ema_before_backward" in cfg.legacy else ("step" if self.offset else "backward")
        self.version = 0  # version of the replicated units now held

    def _flat(self, units: list[int]) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for u in units for p in self.units[u].parameters()])

    def push(self, version: int) -> None:
        """After the optimizer step that produced ``version``: send it to every stage that reads these units."""
        if version % self.every == 0:
            for receiver, units in self.gives.items():
                self.link.post_up(receiver, WEIGHTS, version, self._flat(units))

    @torch.no_grad()
    def _receive(self, target: int) -> None:
        while self.version < target:
            version = self.version + self.every
            for owner, units in self.needs.items():
                flat = self.link.take_up(owner, (WEIGHTS,), version)[3]
                offset = 0
                for p in (p for u in units for p in self.units[u].parameters()):
                    p.copy_(flat[offset : offset + p.numel()].view(p.shape))
                    offset += p.numel()
                if offset != flat.numel():
                    raise StageError(f"{self.link.name}: stage {owner} sent {flat.numel()} weights, {offset} expected")
            self.version = version

    def pull(self, point: str, step: int) -> None:
        """Before the EMA update at ``point`` of ``step``: hold version N·⌊(step + o)/N⌋."""
        if point == self.point and self.needs:
            self._receive(self.every * ((step + self.offset) // self.every))

    def drain(self, steps_done: int) -> None:
        """Receive every version sent so far (before a checkpoint and at the end), so none stays in flight."""
        if self.needs:
            self._receive(self.every * (steps_done // self.every))

    def state_dict(self) -> dict[str, object]:
        units = [u for group in self.needs.values() for u in group]
        return {"version": self.version, "units": {str(u): self.units[u].state_dict() for u in units}}

    def load_state_dict(self, state: dict) -> None:
        self.version = int(state["version"])
        for unit, weights in state["units"].items():
            self.units[int(unit)].load_state_dict(weights)


class CascadeGrads:
    """Cascade losses of one stage: its own backward, the one-hop gradient messages, and the relays (module doc)."""

    def __init__(self, engine: LocalEngine, link: Link) -> None:
        self.engine, self.link, self.k = engine, link, link.stage
        self.span = engine.method.max_reach
        self.origins = list(range(self.k + 1, min(self.k + self.span - 1, engine.k - 1) + 1))

    def _wants(self, origin: int) -> bool:
        """Does stage k-1 expect a message from ``origin`` (it is within its longest reach)?"""
        return self.k >= 1 and origin - (self.k - 1) <= self.span - 1

    def _send(self, step: int, origin: int, grad: torch.Tensor | None, reach_left: int) -> None:
        if self._wants(origin):
            kind = NOGRAD if grad is None else GRAD
            self.link.post_up(self.k - 1, kind, step, grad, (origin, reach_left))

    def own(self, step: int, losses: list, x: torch.Tensor) -> None:
        """Backward of this stage's losses; a loss that reaches earlier modules also yields d(loss)/dx, sent on."""
        engine, k = self.engine, self.k
        sent = False
        for loss, reach in losses:
            reach = min(reach, k + 1)
            if reach == 1:
                if loss.requires_grad:
                    engine.local_backward(loss, k, 1, x, [], self.span)
                continue
            if sent:
                raise StageError(f"{self.link.name}: PPLL supports one cascade loss per module, got more")
            sent, grad = True, None
            if loss.requires_grad:
                scaled = engine.scale(loss)
                leaves = grad_leaves(x)
                torch.autograd.backward(scaled, inputs=[*engine.module_parameters(k), *leaves], retain_graph=True)
                grad = take_input_grad(x)
            self._send(step, k, grad, reach - 1)
        if not sent:
            self._send(step, k, None, 0)

    def downstream(self, step: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """Receive the gradients of later stages' cascades for ``step``, backpropagate each through this stage's
        retained graph, and relay the input gradient while the cascade reaches further."""
        params = self.engine.module_parameters(self.k, aux=False)
        for origin in self.origins:
            kind, _, (got, reach_left), grad = self.link.take_up(self.k + 1, (GRAD, NOGRAD), step)
            if got != origin:
                raise StageError(f"{self.link.name}: cascade gradient of stage {got} arrived, stage {origin} expected")
            if kind == NOGRAD:
                self._send(step, origin, None, 0)
                continue
            further = reach_left > 1 and self.k > 0
            outs, grads = output_grads(out, grad)
            inputs = [*params, *grad_leaves(x)] if further else params
            if outs:
                torch.autograd.backward(outs, grad_tensors=grads, inputs=inputs, retain_graph=True)
            relay = take_input_grad(x) if further else None
            self._send(step, origin, relay, reach_left - 1)


def take_input_grad(x: Any) -> torch.Tensor | None:
    """d(loss)/dx gathered on a stage's leaf input, cleared, as one message payload: the gradient itself for a
    tensor; for a captured model's carry one flat tensor, a presence flag per floating tensor of the carry and then
    the gradients that are present (a tensor the loss never reached has none, as in the sequential engine, so the
    earlier stage skips it instead of backpropagating zeros). None when nothing was reached."""
    if not isinstance(x, tuple):
        grad, x.grad = x.grad, None
        return grad
    floats = [t for t in carry_tensors(x) if t.is_floating_point()]
    grads = [t.grad for t in floats]
    for t in floats:
        t.grad = None
    if all(g is None for g in grads):
        return None
    flags = torch.tensor([g is not None for g in grads], dtype=floats[0].dtype, device=floats[0].device)
    return torch.cat([flags, *(g.reshape(-1) for g in grads if g is not None)])


def output_grads(out: Any, grad: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The (outputs, gradients) pairs a received cascade gradient (:func:`take_input_grad`'s payload) backpropagates
    through this stage's output, each gradient with the strides the sequential engine's has."""
    if not isinstance(out, tuple):
        return [out], [torch.empty_like(out).copy_(grad)]
    floats = [o for o in carry_tensors(out) if o.is_floating_point()]
    flags, offset = grad[: len(floats)].tolist(), len(floats)
    outs, grads = [], []
    for o, present in zip(floats, flags):
        if not present:
            continue
        piece = grad[offset : offset + o.numel()].view(o.shape)
        offset += o.numel()
        if o.requires_grad:
            outs.append(o)
            grads.append(torch.empty_like(o).copy_(piece))
    return outs, grads


class CrossStage:
    """What crosses this stage's boundaries besides activations: EMA weights and cascade gradients (either may be
    None). Built collectively by every rank (it creates the upstream process group when one is needed)."""

    def __init__(self, shipping: WeightShipping | None, cascade: CascadeGrads | None) -> None:
        self.shipping, self.cascade = shipping, cascade

    @staticmethod
    def needed(engine: LocalEngine) -> bool:
        """Does this method send anything upstream (same answer on every rank)?"""
        return engine.method.max_reach > 1 or any(ema_needs(engine, k) for k in range(engine.k))

    @classmethod
    def build(cls, engine: LocalEngine, link: Link, every: int = 1) -> CrossStage | None:
        if not cls.needed(engine):
            return None
        if link.back is None:
            raise ValueError("this method sends messages upstream: give the Link a `back` process group")
        shipping = WeightShipping(engine, link, every)
        cross = cls(
            shipping if shipping.needs or shipping.gives else None,
            CascadeGrads(engine, link) if engine.method.max_reach > 1 else None,
        )
        if cross.shipping is not None:
            link.on_shutdown.append(cross.shipping.drain)
        return cross

    def pull(self, point: str, step: int) -> None:
        if self.shipping is not None:
            self.shipping.pull(point, step)

    def stepped(self, step: int) -> None:
        """After this stage's optimizer step of ``step``: ship version step+1, then take what the EMA update after
        the step needs (in this order, so a chain of stages never waits on itself)."""
        if self.shipping is not None:
            self.shipping.push(step + 1)
            self.shipping.pull("step", step)

    def drain(self, steps_done: int) -> None:
        if self.shipping is not None:
            self.shipping.drain(steps_done)
