"""The split, decided in one place: how many local modules (K), and where each ends.

``split`` (:class:`~locallearn.train.config.SplitCfg`) names it: ``k``; ``preset``: ``auto`` (balanced by
``balance``: equal ``units``, ``params``, ``flops``, saved ``activations``, or measured ``time``), a paper preset
(``infopro``, ``infopro_star``, ``man``, ...; tables and the balancing algorithm in :mod:`locallearn.local.split`)
or ``ends`` (explicit); ``cuts``: submodules of a captured model after which modules end. :func:`resolve_split`
turns a config into module ends and validates them; :func:`time_balanced_split` measures the ``time`` balance
once, before the run's engine is built (docs/configuration.md, ``split``; docs/methods.md, "Splits").

Balanced by measured time (docs/methods.md, "Splits balanced by measured time").

In a pipeline the slowest stage sets the pace, and a stage's time is its units' forward + backward *plus its aux
net*, which parameter or FLOP counts of the backbone do not see (InfoPro's decoder on a 32×32 map costs more than
the block it trains). So we measure: a probe engine with one module per unit (the method's aux net at every
possible split point) times, on a real batch,

* ``unit[u]``: forward + backward of unit u alone (gradient of a fixed random projection of its output);
* ``aux[u]``: forward + backward of the method's losses on unit u's output (the aux net, or the task loss on
  the last unit), i.e. what closing a module at u adds.

A module over units [s, e) then costs Σ unit[s..e-1] + aux[e-1], and :func:`~locallearn.local.split.balanced_split`
minimises the largest module. Times are medians of ``repeats`` interleaved rounds after a warm-up round, so
neither one noisy step nor a drifting machine moves a split; the probe's InfoPro λ schedule is that of K =
number of units, so a term whose λ is 0 only at the final K is still timed (a small overestimate, never an
omission).

Per-unit sums cannot settle near-ties: on ViT-Ti the DGL aux net costs about one block, so ends [6, 14] and
[7, 14] predict the same slowest module, yet under PPLL [6, 14] left stage 0 idle 19 % of the time
(``benchmarks/pipeline_fmnist_k2_same_window/``). So the best split and its neighbours one boundary away whose
prediction is within ``tolerance`` of it are **timed as whole modules** (forward, local losses, backward, as a
training step runs them), in interleaved rounds (twice the probe's: candidates differ by little), and the split
whose slowest timed module is fastest wins.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..local.split import backbone_layout, balanced_split, check_k, preset_split, validate_ends
from ..measure.profile import unit_costs
from ..methods.base import method_class
from ..models.units import ModuleBackbone, UnitBackbone, backward_carry, carry_tensors, detach_carry
from ..tasks.task import Batch
from .config import SplitCfg


def resolve_k(split: SplitCfg, method: str) -> int:
    """The module count a config asks for: ``split.k``, else len(``split.cuts``) + 1, else the method's default."""
    if split.k is not None:
        return split.k
    return len(split.cuts) + 1 if split.cuts else method_class(method).default_k


def resolve_split(
    backbone: UnitBackbone, split: SplitCfg, method: str, sample: torch.Tensor | None = None
) -> list[int]:
    """Exclusive end unit index of each local module, from ``split.preset`` (a paper preset, ``auto`` balanced by
    ``split.balance``, or ``ends``), ``split.cuts`` (submodules of a captured model) or the cuts / k a captured
    backbone was built with; ``method`` gives the default K."""
    n = len(backbone)
    if split.cuts:
        if not isinstance(backbone, ModuleBackbone):
            raise ValueError(
                "split.cuts names submodules of your own model (model.name=package.module:function, or "
                "UnitBackbone.from_module); for a zoo backbone use split.preset or split.ends"
            )
        return _agree(backbone.ends_after(split.cuts), split, "split.cuts")
    if backbone.planned_ends is not None and split.preset == "auto" and not split.ends:
        return _agree(list(backbone.planned_ends), split, "the backbone's cuts")
    if backbone.planned_k is not None:
        if split.k is not None and split.k != backbone.planned_k:
            raise ValueError(
                f"split.k={split.k} but the backbone was wrapped with k={backbone.planned_k}; make them agree"
            )
        split = replace(split, k=backbone.planned_k)
    k = resolve_k(split, method)
    check_k(k, n)
    if split.preset == "ends":
        return _agree(validate_ends(split.ends, n), split, "split.ends")
    if split.ends:
        raise ValueError("split.ends is only used with split.preset=ends")
    if split.preset == "auto":
        if k == 1:  # one module (E2E): nothing to balance, whatever split.balance says
            return [n]
        if split.balance == "time":
            raise ValueError(
                "split.balance=time is measured before the engine is built (locallearn train/summary do it); in "
                "Python use locallearn.train.split.time_balanced_split, or pass split.preset=ends"
            )
        if split.balance in ("flops", "activations") and sample is None:
            raise ValueError(f"split.balance={split.balance} needs a sample input to measure the units")
        return balanced_split(unit_costs(list(backbone.units), sample, split.balance), k)
    # Presets are looked up by the backbone's layout (blocks per stage): CIFAR/ImageNet ResNets, ViT.
    return preset_split(split.preset, backbone_layout(backbone.infos), k)


def _agree(ends: list[int], split: SplitCfg, source: str) -> list[int]:
    if split.k is not None and len(ends) != split.k:
        raise ValueError(f"{source} make {len(ends)} modules but split.k={split.k}; set split.k={len(ends)} (or null)")
    return ends


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_unit_times(probe: Any, batch: Batch, repeats: int = 3) -> tuple[list[float], list[float]]:
    """(unit seconds, aux seconds) per unit of ``probe``, an engine with one module per unit.

    Rounds are interleaved: each round times every unit and aux net once, in order, and a unit's time is its
    median over ``repeats`` rounds after a warm-up round (allocator, oneDNN primitive cache, lazy init). A machine
    whose speed drifts during the probe then slows every unit of a round alike instead of the units timed last,
    which would move the split."""
    if probe.k != len(probe.backbone):
        raise ValueError(f"the time probe needs one module per unit, got K={probe.k} for {len(probe.backbone)} units")
    probe.backbone.train()
    probe.method.train()
    rounds: list[list[tuple[float, float]]] = []
    grads: list[list[torch.Tensor | None]] = []  # a fixed random projection per unit output, drawn in round one
    for _ in range(repeats + 1):
        h, times = batch.input, []
        for k, module in enumerate(probe.modules):
            x = detach_carry(h)
            with torch.no_grad():
                out = module(x)
            if len(grads) == k:
                grads.append([torch.randn_like(t) if t.is_floating_point() else None for t in carry_tensors(out)])

            def unit_step(module=module, x=x, grad=grads[k]) -> None:
                backward_carry(module(x), grad)

            def aux_step(k=k, out=out) -> None:
                leaf = detach_carry(out, requires_grad=True)
                loss = probe.method.local_loss(k, leaf, batch)
                if loss.requires_grad:
                    loss.backward()

            times.append((_seconds(unit_step, probe.device), _seconds(aux_step, probe.device)))
            h = out
        rounds.append(times)
    timed = rounds[1:]
    unit_s = [statistics.median(r[k][0] for r in timed) for k in range(probe.k)]
    aux_s = [statistics.median(r[k][1] for r in timed) for k in range(probe.k)]
    for module in probe.modules:
        module.zero_grad(set_to_none=True)
    return unit_s, aux_s


def time_balanced_ends(unit_s: list[float], aux_s: list[float], k: int) -> list[int]:
    """The contiguous K-module split minimising the slowest module, a module over [s, e) costing
    Σ unit_s[s:e] + aux_s[e-1]."""
    return balanced_split(unit_s, k, end_costs=aux_s)


def predicted_module_times(unit_s: list[float], aux_s: list[float], ends: list[int]) -> list[float]:
    """Seconds per module of the split ``ends`` from the per-unit probe: Σ unit_s[s:e] + aux_s[e-1]."""
    return [sum(unit_s[s:e]) + aux_s[e - 1] for s, e in zip([0, *ends[:-1]], ends)]


def candidate_splits(
    unit_s: list[float], aux_s: list[float], ends: list[int], tolerance: float = 0.1, limit: int = 5
) -> list[list[int]]:
    """``ends`` (the best predicted split) first, then its neighbours (one boundary moved by one unit) whose
    predicted slowest module is within ``tolerance`` of the best, most promising first; at most ``limit``."""
    best = max(predicted_module_times(unit_s, aux_s, ends))
    scored = []
    for i in range(len(ends) - 1):
        low = ends[i - 1] if i else 0
        for step in (-1, 1):
            moved = [*ends[:i], ends[i] + step, *ends[i + 1 :]]
            if low < moved[i] < ends[i + 1]:
                slowest = max(predicted_module_times(unit_s, aux_s, moved))
                if slowest <= best * (1 + tolerance):
                    scored.append((slowest, moved))
    scored.sort(key=lambda item: item[0])
    return [ends, *(moved for _, moved in scored)][:limit]


def _module_seconds(engine: Any, batch: Batch) -> list[float]:
    """One pass of ``engine``'s modules on ``batch``, each timed as a training step runs it (forward, local
    losses, backward; no optimizer step, gradients dropped)."""
    times, h = [], batch.input
    for k, module in enumerate(engine.modules):
        x, outs = detach_carry(h), []

        def module_step(k=k, module=module, x=x, outs=outs) -> None:
            with engine.autocast():
                out = module(x)
                losses = [loss for loss, _ in engine.method.local_losses(k, out, batch) if loss.requires_grad]
            if losses:
                torch.stack([loss.float() for loss in losses]).sum().backward()
            outs.append(detach_carry(out))

        times.append(_seconds(module_step, engine.device))
        h = outs[0]
    for module in engine.modules:
        module.zero_grad(set_to_none=True)
    engine.method.zero_grad(set_to_none=True)
    return times


def time_candidate_splits(engines: list[Any], batch: Batch, repeats: int = 3) -> list[list[float]]:
    """Seconds per module of each engine (one per candidate split), medians over ``repeats`` rounds after a
    warm-up round. Every round times every candidate, odd rounds in reverse order, so drift and position slow
    every candidate alike."""
    for engine in engines:
        engine.backbone.train()
        engine.method.train()
    rounds: list[list[list[float]]] = [[] for _ in engines]
    for r in range(repeats + 1):
        order = range(len(engines)) if r % 2 == 0 else reversed(range(len(engines)))
        for i in order:
            times = _module_seconds(engines[i], batch)
            if r:
                rounds[i].append(times)
    return [[statistics.median(t[m] for t in timed) for m in range(len(timed[0]))] for timed in rounds]


def time_balanced_split(
    split: SplitCfg, method: str, build: Callable[[SplitCfg], Any], batch: Batch, repeats: int = 3
) -> tuple[SplitCfg, list[float]]:
    """``split`` with ``balance: time`` resolved to explicit ends (so a resumed run, or every pipeline rank, uses
    the same split without measuring again), and the timed seconds per module of that split. ``build`` makes an
    engine for a split (the caller's backbone, method and task). The per-unit probe proposes the candidates, the
    whole-module timing picks one (see "Balanced by measured time" above)."""
    probe_k = len(build(replace(split, k=1, preset="auto", balance="units", ends=[])).backbone)
    k = resolve_k(split, method)
    check_k(k, probe_k)
    probe = build(replace(split, k=probe_k, preset="ends", ends=list(range(1, probe_k + 1))))
    unit_s, aux_s = measure_unit_times(probe, batch, repeats)
    del probe
    candidates = candidate_splits(unit_s, aux_s, time_balanced_ends(unit_s, aux_s, k))
    splits = [replace(split, k=k, preset="ends", ends=ends) for ends in candidates]
    timed = time_candidate_splits([build(s) for s in splits], batch, 2 * repeats)
    best = min(range(len(splits)), key=lambda i: max(timed[i]))
    return splits[best], timed[best]
