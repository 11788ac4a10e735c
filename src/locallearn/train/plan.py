"""``locallearn plan``: which K and batch fit a memory budget, answered from the meta-device estimator.

    locallearn plan -c configs/imagenet/resnet101_dgl_k2.yaml --memory 80GiB
    locallearn plan -c configs/imagenet/resnet152_e2e.yaml --memory 24GiB --devices 4

For every candidate K of the configured method (E2E: K=1; a split preset: the K it defines; ``auto``: 2, 3, 4, 6,
8, 12, 16 up to the unit count), the predicted peak of a training step is found for growing batches by running the
engine on the ``meta`` device (:mod:`.estimate`): parameters, gradients, optimizer state and frozen EMA copies, plus
the live-bytes peak of one steady-state step (:class:`~locallearn.measure.memory.LiveBytes`: every tensor the step
creates, counted until it dies). With ``--devices N`` the modules are PPLL stages, one per device (K = N), and each
device must hold its own stage. The answer is the smallest K that fits at the configured batch (fewer cuts keep
accuracy closest to E2E), else the largest batch that fits; the table shows every candidate.

The prediction leaves out what no op returns (a convolution's workspace, the CUDA context, allocator rounding); on
this project's CPU machine it came within 0–3 % of the allocator-level peak for E2E and InfoPro and 7–12 % under it
for DGL, whose aux convolutions use workspaces (``tests/test_plan.py``, ``docs/benchmarks.md``). Keep a margin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..local.split import backbone_layout, presets_for
from ..measure.memory import LiveBytes
from ..models.units import detach_carry
from .config import ConfigError, TrainCfg
from .engine import LocalEngine
from .estimate import meta_batch, meta_engine
from .split import resolve_k

AUTO_KS = (2, 3, 4, 6, 8, 12, 16)
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``24GiB``, ``80GB``, ``512MiB``, ``1.5T`` → bytes (binary units either way, as GPU memory is quoted)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match:
        raise ConfigError(f"--memory {text!r}: give a size like 24GiB, 80GB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def _held(engine: LocalEngine, modules: range) -> list[torch.Tensor]:
    """Gradients and optimizer state of ``modules``: they exist between steps, and a step may free them."""
    out: list[torch.Tensor] = []
    for k in modules:
        out += [p.grad for p in engine.module_parameters(k) if p.grad is not None]
        out += engine.optimizer_tensors(range(k, k + 1))
    return out


def _state_bytes(engine: LocalEngine, modules: range) -> int:
    """Parameters (frozen EMA copies included), gradients and optimizer state of ``modules`` after a step."""
    tensors = {id(t): t for t in _held(engine, modules)}
    for k in modules:
        aux = engine.method.aux[k]
        for p in [*engine.modules[k].parameters(), *(aux.parameters() if aux is not None else [])]:
            tensors[id(p)] = p
    return sum(t.untyped_storage().nbytes() for t in tensors.values())


def predicted_peaks(cfg: TrainCfg) -> list[int]:
    """Predicted peak bytes of one steady-state step: ``[whole engine]``, or per PPLL stage when
    ``cfg.parallel == "ppll"`` (each stage's own module, aux net and step)."""
    batch = meta_batch(cfg)
    engine = meta_engine(cfg, batch)
    engine.train_step(batch)  # the first step creates the optimizer state a steady-state step starts with
    if cfg.parallel != "ppll":
        with LiveBytes(_held(engine, range(engine.k))) as live:
            engine.train_step(batch)
        return [_state_bytes(engine, range(engine.k)) + live.peak]
    peaks, h = [], batch.input
    for k in range(engine.k):  # each stage alone: its forward, losses, backward and step
        with LiveBytes(_held(engine, range(k, k + 1))) as live:
            engine.zero_grad(k)
            x = detach_carry(h)
            out = engine.modules[k](x)
            for loss, _ in engine.method.local_losses(k, out, batch):  # as a PPLL stage runs them
                if loss.requires_grad:
                    engine.local_backward(loss, k, 1, x, [], engine.method.max_reach)
            engine.step_module(k)
            del out, x
        peaks.append(_state_bytes(engine, range(k, k + 1)) + live.peak)
        with torch.no_grad():
            h = engine.modules[k](detach_carry(h))
    return peaks


@dataclass
class Candidate:
    k: int
    ends: list[int]
    peak_at_batch: int  # predicted peak of the worst device at the configured batch
    largest_batch: int  # the largest power-of-two batch that fits (0: not even 2)
    peak_at_largest: int


def candidate_ks(cfg: TrainCfg, devices: int) -> list[int]:
    if devices > 1:
        return [devices]
    if cfg.method.name == "e2e":
        return [1]
    if cfg.split.preset not in ("auto", "ends"):
        engine = meta_engine(cfg, meta_batch(replace(cfg, data=replace(cfg.data, batch_size=1))))
        layout = backbone_layout(engine.backbone.infos)
        return presets_for(layout).get(cfg.split.preset, [resolve_k(cfg.split, cfg.method.name)])
    units = len(
        meta_engine(
            replace(cfg, split=replace(cfg.split, k=1, ends=[], preset="auto")),
            meta_batch(replace(cfg, data=replace(cfg.data, batch_size=1))),
        ).backbone
    )
    return [k for k in AUTO_KS if k <= units]


def _peak(base: TrainCfg, batch: int) -> int:
    """The worst device's predicted peak of ``base`` at ``batch``."""
    return max(predicted_peaks(replace(base, data=replace(base.data, batch_size=batch))))


def largest_fitting(base: TrainCfg, budget: int, max_batch: int) -> int:
    """The largest power-of-two batch (>= 2: BatchNorm needs two samples) whose peak fits, by bisection on the
    exponent (memory grows with the batch); 0 when even 2 does not fit."""
    if _peak(base, 2) > budget:
        return 0
    low, high = 1, max_batch.bit_length() - 1  # 2**low fits; above 2**high is not tried
    while low < high:
        mid = (low + high + 1) // 2
        if _peak(base, 2**mid) <= budget:
            low = mid
        else:
            high = mid - 1
    return 2**low


def plan(
    cfg: TrainCfg, budget: int, devices: int = 1, max_batch: int = 4096
) -> tuple[Candidate | None, list[Candidate]]:
    """Every candidate K with its predicted peak at the configured batch and the largest batch under ``budget``;
    the chosen one (smallest K that fits at the configured batch) or None."""
    if devices < 1:
        raise ConfigError(f"--devices must be >= 1, got {devices}")
    candidates = []
    for k in candidate_ks(cfg, devices):
        split = replace(cfg.split, k=k, ends=[]) if cfg.split.preset != "ends" else cfg.split
        base = replace(cfg, split=split, parallel="ppll" if devices > 1 else "none")
        fits = largest_fitting(base, budget, max_batch)
        ends = meta_engine(base, meta_batch(replace(base, data=replace(base.data, batch_size=2)))).ends
        candidates.append(Candidate(k, list(ends), _peak(base, cfg.data.batch_size), fits, _peak(base, fits or 2)))
    chosen = next((c for c in candidates if c.peak_at_batch <= budget), None)
    return chosen, candidates


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render(cfg: TrainCfg, budget: int, devices: int, chosen: Candidate | None, candidates: list[Candidate]) -> str:
    where = f"{devices} devices (PPLL, one stage each)" if devices > 1 else "one device"
    lines = [
        f"{cfg.model.name}, {cfg.method.name}, batch {cfg.data.batch_size}, {where}, budget {size(budget)} "
        "(predicted on the meta device: parameters, gradients, optimizer state + the step's live-bytes peak)",
        "| K | module ends | peak at the configured batch | fits | largest batch that fits | its peak |",
        "|---|---|---|---|---|---|",
    ]
    for c in candidates:
        fits = "yes" if c.peak_at_batch <= budget else "no"
        lines.append(
            f"| {c.k} | {c.ends} | {size(c.peak_at_batch)} | {fits} | {c.largest_batch or '-'} | "
            f"{size(c.peak_at_largest)} |"
        )
    if chosen is not None:
        lines.append(
            f"plan: K={chosen.k} (ends {chosen.ends}) fits batch {cfg.data.batch_size} with "
            f"{size(chosen.peak_at_batch)}; up to batch {chosen.largest_batch} fits"
        )
        return "\n".join(lines)
    best = max(candidates, key=lambda c: (c.largest_batch, -c.peak_at_largest))
    if best.largest_batch:
        lines.append(
            f"plan: batch {cfg.data.batch_size} fits no K; the closest is K={best.k} at batch {best.largest_batch} "
            f"({size(best.peak_at_largest)})"
        )
    else:
        lines.append(
            f"plan: nothing fits, not even batch 2; the closest is K={best.k}, which needs "
            f"{size(best.peak_at_largest)} at batch 2"
        )
    return "\n".join(lines)


def plan_command(cfg: TrainCfg, memory: str, devices: int) -> dict[str, Any]:
    budget = parse_bytes(memory)
    chosen, candidates = plan(cfg, budget, devices)
    print(render(cfg, budget, devices, chosen, candidates))
    return {"chosen": chosen, "candidates": candidates}
