"""Where the :class:`~locallearn.train.trainer.Trainer`'s steps run: the runtime interface and its one-process
implementation. The other two live with their communication code: a PPLL stage rank
(:class:`locallearn.parallel.ppll.StageRuntime`) and a data-parallel replica
(:class:`locallearn.parallel.data_parallel.ReplicaRuntime`); docs/architecture.md, "Trainer and runtimes".

A runtime owns only what is its own: where batches come from, what crosses processes (activations, gradient
averages), how per-rank figures become the run's, which rank writes, and what a checkpoint file holds. The epoch
loop, the lr schedule, ``max_steps``, checkpoint cadence and their resume carry, the record, evaluation cadence,
progress bar, console and logs belong to the trainer, written once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..tasks.task import Batch
from .checkpoint import save_checkpoint
from .engine import LocalEngine, StepResult


@dataclass
class Reduced:
    """An epoch's (or part's) training figures of the whole run, as the record reports them."""

    losses: list[float]  # mean local loss per module
    stat_sum: float  # the final head's task.train_stat summed over the samples seen
    seconds: float  # wall seconds of training (the slowest stage's in a pipeline)
    extra: dict[str, Any] = field(default_factory=dict)  # runtime-specific record keys (busy_fraction, world_size)


class Runtime(Protocol):
    """What the trainer asks of the place its steps run. ``figures`` are the K + 2 sums of
    :class:`~locallearn.train.engine.StepResult` (per-module loss, train_stat, steps); every method marked
    collective is called by every rank in the same order."""

    engine: LocalEngine
    train_loader: Any
    run_dir: Path
    writes: bool  # this rank logs, prints and writes run-level files (config.yaml, env.json)
    label: str  # console prefix ("" in one process)
    measures: bool  # the saved-tensor meter may watch the first steps (one process only)
    solo: bool  # decides alone: signals and time-based checkpoints stop or save at its own current step

    def batches(self, epoch: int, start: int) -> Iterable[Any]:
        """This rank's loader items of ``epoch`` from batch ``start`` on (placeholders where it reads none)."""

    def step(self, item: Any, step: int) -> StepResult:
        """Global step ``step`` on one loader item."""

    def begin_epoch(self, carried: dict[str, Any]) -> None:
        """Start the runtime's own clocks of an epoch, continuing ``carried`` ones (:meth:`carry`)."""

    def carry(self) -> dict[str, Any]:
        """The runtime's own clocks since :meth:`begin_epoch`, kept in a mid-epoch checkpoint."""

    def sync(self, steps_done: int, flush: bool = True) -> None:
        """Collective, before a checkpoint or an evaluation: the state every writer must see."""

    def agree(self, value: float) -> float:
        """Collective: rank 0's ``value`` on every rank (a decision taken from one rank's timing)."""

    def stop_step(self, step: int, received: str | None) -> tuple[int, str] | None:
        """After ``step``: the step at which the run stops to checkpoint, and why (``SIGINT``), once a signal
        arrived here (``received``) or anywhere in the run; None while none did."""

    def reduce(self, figures: torch.Tensor, seconds: float) -> Reduced:
        """Collective: this rank's figures and seconds become the run's."""

    def evaluate(self) -> dict[str, Any]:
        """Collective: the engine's evaluation keys (``test_<metric>``, ``test_loss``, ``aux_<headline>``)."""

    def save(self, position: dict[str, Any], carry: dict[str, Any] | None, name: str = "last") -> None:
        """Collective: write this runtime's checkpoint(s) ``name`` (``last``, ``best``) with ``position`` (config,
        epoch, steps) and ``carry`` (the unrecorded steps' seconds and figures; None at an epoch's end)."""

    def load(self) -> dict[str, Any]:
        """Collective: restore the checkpoint; its position, with ``unrecorded`` holding this rank's carry."""

    def environment(self) -> dict[str, Any]:
        """Extra ``env.json`` entries (world size, cores)."""

    def close(self, steps_done: int) -> None:
        """After the last step: nothing left in flight."""


class LocalRuntime:
    """One process: the engine runs every module on each batch of the loader; one checkpoint file."""

    label, measures, writes, solo = "", True, True, True

    def __init__(
        self, engine: LocalEngine, train_loader: Any, test_loader: Any, run_dir: Path, state: dict | None = None
    ) -> None:
        self.engine, self.train_loader, self.test_loader, self.run_dir = engine, train_loader, test_loader, run_dir
        self.state = state  # the checkpoint being resumed (already read to build the run)

    def batches(self, epoch: int, start: int) -> Iterable[Any]:
        return self.train_loader.batches(epoch, start)

    def step(self, item: Any, step: int) -> StepResult:
        return self.engine.train_step(Batch(*item))

    def begin_epoch(self, carried: dict[str, Any]) -> None:
        pass

    def carry(self) -> dict[str, Any]:
        return {}

    def sync(self, steps_done: int, flush: bool = True) -> None:
        pass

    def agree(self, value: float) -> float:
        return value

    def stop_step(self, step: int, received: str | None) -> tuple[int, str] | None:
        return None if received is None else (step, received)

    def reduce(self, figures: torch.Tensor, seconds: float) -> Reduced:
        values = figures.tolist()
        steps = max(values[-1], 1.0)
        return Reduced([v / steps for v in values[:-2]], values[-2], seconds)

    def evaluate(self) -> dict[str, Any]:
        return {} if self.test_loader is None else self.engine.evaluate(self.test_loader.batches())

    def save(self, position: dict[str, Any], carry: dict[str, Any] | None, name: str = "last") -> None:
        state = {**self.engine.state_dict(), **position, "rng_torch": torch.get_rng_state(), "unrecorded": carry}
        save_checkpoint(state, self.run_dir / f"ckpt_{name}.pt")

    def load(self) -> dict[str, Any]:
        state = self.state
        self.engine.load_state_dict(state)
        torch.set_rng_state(state["rng_torch"])
        return state

    def environment(self) -> dict[str, Any]:
        return {}

    def close(self, steps_done: int) -> None:
        pass
