"""Throughput: images/s over timed steps after warm-up, median of repeats, interleaved across methods.

On a shared machine the load drifts over minutes, so timing method A for a minute and then method B compares A
under one load with B under another. :func:`interleaved_throughput` instead times a short block of steps of every
method in turn, repeats that round, and reports per method the median images/s and the median of the *per-round*
ratios to the reference: both runs of a ratio saw nearly the same load. CPU timing uses ``time.perf_counter``;
CUDA timing uses events around the timed block (no host sync inside it), as airbench does (docs/benchmarks.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


class BlockTimer:
    """Seconds taken by a block of device work: CUDA events on a CUDA device, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> BlockTimer:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0


@dataclass
class Throughput:
    """One method's timings: ``images_per_s`` per round, its median, and the median per-round ratio to the
    reference (None if there is no reference)."""

    name: str
    batch_size: int = 0
    images_per_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    first_step_s: float | None = None  # the first warm-up step alone: with ``run.compile``, mostly compile time

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def step_ms(self) -> float:
        """Median step time in ms at the measured batch size (inverse of the median throughput)."""
        return 1000.0 * self.batch_size / self.median if self.median else float("nan")


def time_block(step: Callable[[int], None], steps: int, images_per_step: int, device: torch.device) -> float:
    """Images/s of ``step(0..steps-1)``, timed as one block."""
    with BlockTimer(device) as t:
        for i in range(steps):
            step(i)
    return steps * images_per_step / max(t.seconds, 1e-12)


def interleaved_throughput(
    steps: dict[str, Callable[[int], None]],
    *,
    images_per_step: int,
    device: torch.device | str = "cpu",
    block: int = 5,
    warmup: int = 2,
    repeats: int = 5,
    reference: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Throughput]:
    """Time every ``steps[name](i)`` (one training step on batch ``i``) in interleaved rounds.

    Each method first runs ``warmup`` steps outside the rounds (allocator, oneDNN primitive caches, lazy init,
    compilation; the first one is timed alone, ``first_step_s``); then for each of ``repeats`` rounds, every method
    in turn runs ``block`` timed steps. Ratios are ``images/s ÷ reference's images/s`` within the same round, then
    the median over rounds.
    """
    if repeats < 1 or block < 1:
        raise ValueError(f"repeats and block must be >= 1, got {repeats} and {block}")
    device = torch.device(device)
    if reference is not None and reference not in steps:
        raise ValueError(f"reference {reference!r} is not among the timed methods {list(steps)}")
    results = {name: Throughput(name, images_per_step) for name in steps}
    for name, step in steps.items():
        for i in range(warmup):
            start = time.perf_counter()
            step(i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i == 0:
                results[name].first_step_s = time.perf_counter() - start
    for r in range(repeats):
        this_round = {name: time_block(step, block, images_per_step, device) for name, step in steps.items()}
        for name, ips in this_round.items():
            results[name].images_per_s.append(ips)
            if reference is not None:
                results[name].ratios.append(ips / this_round[reference])
        if progress is not None:
            progress(f"round {r + 1}/{repeats}: " + ", ".join(f"{n} {v:.0f}" for n, v in this_round.items()))
    return results


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of timings (what a results table needs to show the spread)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
