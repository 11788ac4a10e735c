"""PPLL: pipeline-parallel local learning, one process per local module (Guo et al., arXiv 2411.12780; design:
docs/pipeline.md).

    torchrun --nproc-per-node 4 -m locallearn train -c configs/fmnist/demo.yaml parallel=ppll
    torchrun --nproc-per-node 4 -m locallearn train --resume runs/<run>             # per-stage checkpoints
    locallearn train -c configs/fmnist/demo.yaml parallel=ppll ppll.procs=4      # spawns the ranks itself
    locallearn train -c ... parallel=ppll ppll.procs=8 ppll.replicas=2           # 4 stages × 2 replicas

Rank k owns local module k, its aux net and its optimizer. Per batch it receives module k-1's detached output,
runs forward, sends its own detached output downstream *before* its backward (early forwarding), then does its
local backward and optimizer step. Labels and the raw image come, by default (``ppll.labels: loader``), from each
rank's own, identically seeded loader (the data stream is a pure function of seed, epoch and batch index), so
only activations cross the wire; with ``ppll.labels: send`` stage 0 alone reads batches and each stage passes
the targets (and raw images) on before computing (:meth:`_Stage.batch`), for data that lives on one node or a
loader that is not reproducible across ranks. Protocol, window and failure handling: :mod:`.link`.

Semantics: module k+1 sees, for batch t, module k's output computed with module k's parameters after t steps —
exactly what the sequential engine does — so PPLL gives bitwise the same parameters as sequential local learning
on CPU (tested for DGL and InfoPro, K = 2..4). Add-ons whose state crosses stages run with
their own messages and documented semantics (:mod:`.cross_stage`): MAN/LAM EMA copies get the later stage's
weights every ``ppll.ema_every`` steps (1 = bitwise the sequential engine), and cascades send one-hop input
gradients upstream (bitwise the sequential engine, at the cost of a backward dependency).
:func:`~.cross_stage.check_supported` refuses, with one line, what cannot run faithfully.

Checkpoints and resume: after every epoch (and every ``run.ckpt_every`` steps) each stage writes
``ckpt_stage{k}.pt`` into the shared run directory: its module, aux net, optimizer, GradScaler, torch RNG state
(one per replica), the replicated units its EMA copies follow (with their version), and (epoch, step in epoch,
global step). Every stage saves its state after the same global step (at different wall times); before saving it
receives every weight message already sent, and activations still in flight are simply recomputed after a
resume. So ``--resume`` restores each rank at the same step and continues bitwise as if never stopped (tested);
stage checkpoints of different steps (a crash between two stages' saves) are refused. Only ``run.*`` schedule
keys and ``ppll.timeout/window/procs/pin_cores`` may change on resume.

Replicated pipelines (2-D mesh, ``ppll.replicas = R``): world = K·R, **rank = replica·K + stage**. Replica r's
pipeline runs on shard r of every global batch (:func:`~.data_parallel.shard`), P2P stays within the replica,
and right before each optimizer step stage k's gradients are averaged over the R replicas of stage k (one
all-reduce in that stage's group, weighted by shard size: :class:`~.data_parallel.GradAverager`). As in
data-parallel training, BatchNorm statistics are per replica; replica 0's BN buffers are broadcast to the
others before evaluation and checkpoints, and replica 0 writes the stage checkpoints and the metrics.

Failure: a receive, send or all-reduce whose peer died fails at once (gloo sees the closed connection) or after
``ppll.timeout`` seconds (a hung peer); the rank then exits non-zero with one line naming itself, what it waited
for, and the ranks whose heartbeat stopped (:class:`~.launch.Heartbeat`), e.g. ``stage 0: stage 1 stopped
answering (Connection closed by peer ...); stage 1 died or hangs (no heartbeat)``. Tested for a rank dying at
start-up and in the middle of a cascade's gradient exchange.

Evaluation, for any task: each stage scores its aux head (the last stage: the final output) on the whole test
set and rank 0 logs the sequential engine's keys (``test_<metric>``, ``test_loss``, ``aux_<headline>``;
:mod:`.stage_eval`).

Balance: ``split.balance: time`` is measured once on rank 0 and broadcast (:func:`~.launch.agreed_config`). Timing:
:class:`~.link.Link` counts the seconds a rank sits blocked, so each stage reports a busy fraction, compute / wall
(docs/pipeline.md, "Measurement rules"). :func:`bench_step` runs the same stage step on fixed batches for
``locallearn bench pipeline``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..tasks.task import Batch
from ..train.build import run_name
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.config import ConfigError, TrainCfg
from ..train.engine import LocalEngine, StepResult
from ..train.rundir import new_run_dir
from ..train.runtime import Reduced
from .cross_stage import CrossStage, check_supported
from .data_parallel import GradAverager, broadcast_buffers, shard
from .launch import (
    StopAgreement,
    agreed,
    agreed_run_dir,
    name_ranks,
    new_group,
    run_torchrun,
    spawn,
    train_rank,
)
from .link import TRAIN, Link, StageError
from .stage_eval import gather_evaluation, stage_evaluate

__all__ = [
    "Link",
    "StageError",
    "StageMessages",
    "StageRuntime",
    "bench_step",
    "check_supported",
    "fit_ppll",
    "load_stages",
    "read_stage_checkpoints",
    "run_stage",
    "spawn_ppll",
    "stage_step",
]


class StageMessages:
    """The engine's :class:`~locallearn.train.engine.StepHooks` for one PPLL stage: early forwarding of the
    output, and the cross-stage messages of MAN/LAM and cascades at their documented points (:mod:`.cross_stage`;
    without ``cross`` every loss stays on this stage, as in timing probes)."""

    def __init__(self, link: Link, cross: CrossStage | None = None) -> None:
        self.link, self.cross, self.step = link, cross, 0
        self.cascade = None if cross is None else cross.cascade

    def forwarded(self, k: int, out: Any) -> None:
        self.link.send(TRAIN, self.step, out)
        if self.cross is not None:
            self.cross.pull("loss", self.step)

    def backward(self, k: int, losses: list, x: Any) -> bool:
        if self.cascade is None:
            return False
        self.cascade.own(self.step, losses, x)
        return True

    def backwarded(self, k: int) -> None:
        if self.cross is not None:
            self.cross.pull("backward", self.step)

    def settled(self, k: int, x: Any, out: Any) -> None:
        if self.cascade is not None:
            self.cascade.downstream(self.step, x, out)

    def stepped(self) -> None:
        if self.cross is not None:
            self.cross.stepped(self.step)


def stage_step(
    engine: LocalEngine, k: int, x: Any, batch: Batch, link: Link, step: int, cross: CrossStage | None = None
) -> StepResult:
    """Module k on one batch through the engine's own step: forward, send downstream at once, local backward,
    optimizer step, with ``cross``'s messages in between."""
    messages = StageMessages(link, cross)
    messages.step = step
    return engine.train_step(batch, modules=range(k, k + 1), x=x, hooks=messages)


def bench_step(
    engine: LocalEngine, batches: list[Batch], link: Link, send_labels: bool = False
) -> Callable[[int], None]:
    """This rank's training step ``i`` on ``batches[i % len]``: the stage's step on fixed batches, for ``locallearn
    bench pipeline``. Every rank holds the same batches; with ``send_labels`` (``ppll.labels: send``) the stages
    after the first still take the targets from stage k-1's DATA messages, so their cost is timed. Every rank
    must call it (it creates the upstream process group when the method needs one)."""
    if CrossStage.needed(engine) and link.back is None:
        link.back = dist.new_group()
    cross = CrossStage.build(engine, link)

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        if send_labels:
            batch = link.relay_data(i, batch if link.stage == 0 else None)[0]
        x = batch.input if link.stage == 0 else link.recv(TRAIN, i)[2]
        stage_step(engine, link.stage, x, batch, link, i, cross)

    return step


class StageRuntime:
    """The trainer's runtime on one PPLL rank: its place in the mesh, its batches, its per-stage checkpoint and
    how the stages' figures become the run's (module doc)."""

    measures = solo = False

    def __init__(
        self,
        cfg: TrainCfg,
        engine: LocalEngine,
        train_loader: Any,
        test_loader: Any,
        device: torch.device,
        out_dir: str | None = None,
    ) -> None:
        rank, world, k = dist.get_rank(), dist.get_world_size(), engine.k
        replicas = cfg.ppll.replicas
        if replicas < 1 or world != k * replicas:
            raise ConfigError(
                f"PPLL runs one process per module and replica: K={k} modules × ppll.replicas={replicas} needs "
                f"{k * max(replicas, 1)} processes, got {world}; launch with --nproc-per-node {k * max(replicas, 1)} "
                f"(or ppll.procs={k * max(replicas, 1)})"
            )
        check_supported(engine)
        self.cfg, self.engine, self.k, self.replicas = cfg, engine, rank % k, replicas
        self.train_loader, self.test_loader = train_loader, test_loader
        name_ranks(lambda r: f"stage {r % k}" + (f" (replica {r // k})" if replicas > 1 else ""))
        self.replica, self.writes = rank // k, rank == 0
        self.label = f"[ppll {k} stages{f' × {replicas} replicas' if replicas > 1 else ''}] "
        back = new_group(cfg) if CrossStage.needed(engine) else None
        groups = [new_group(cfg, [r * k + s for r in range(replicas)]) for s in range(k)] if replicas > 1 else []
        self.group = groups[self.k] if groups else None
        self.link = Link(rank, world, cfg.ppll.window, cfg.model.channels_last, device, stages=k, back=back)
        self.cross = CrossStage.build(engine, self.link, cfg.ppll.ema_every)
        self.averager = None
        if self.group is not None:
            engine.grad_sync = self.averager = GradAverager(engine, self.group, self.link.name)
        aux = engine.method.aux[self.k]
        self.parts = [engine.modules[self.k]] + ([] if aux is None else [aux])
        self.send_labels = cfg.ppll.labels == "send"
        self.reads_data = self.k == 0 or not self.send_labels
        self.run_dir = agreed_run_dir(cfg, out_dir, run_name(cfg), device)
        self.idle_mark = 0.0
        # A stage runs at most its send window ahead of the next: the spread of steps across the pipeline.
        self.stopping = StopAgreement(margin=(cfg.ppll.window + 1) * k + 2)

    def batches(self, epoch: int, start: int) -> Iterable[Any]:
        if self.reads_data:
            return self.train_loader.batches(epoch, start)
        return [None] * (len(self.train_loader) - start)

    def batch(self, item: tuple | None, step: int) -> tuple[Batch, float]:
        """Training batch ``step`` for this stage and its replica's share of the global batch: from this rank's
        loader (``item``), or with ``ppll.labels: send`` from stage k-1's DATA message, passed on downstream at
        once so the next stage never waits for this one's compute."""
        if item is None:
            batch, whole = self.link.relay_data(step, None)
            return batch, len(batch) / whole
        batch, weight = shard(Batch(*item), self.replica, self.replicas)
        if self.send_labels:
            self.link.relay_data(step, batch, len(item[1]))
        return batch, weight

    def step(self, item: Any, step: int) -> StepResult:
        batch, weight = self.batch(item, step)
        if self.averager is not None:
            self.averager.weight = weight
        x = batch.input if self.k == 0 else self.link.recv(TRAIN, step)[2]
        return stage_step(self.engine, self.k, x, batch, self.link, step, self.cross)

    def begin_epoch(self, carried: dict[str, Any]) -> None:
        self.idle_mark = self.link.idle - carried.get("idle", 0.0)

    def carry(self) -> dict[str, Any]:
        return {"idle": self.link.idle - self.idle_mark}

    def sync(self, steps_done: int, flush: bool = True) -> None:
        """Before an evaluation or a checkpoint: no weight message in flight (and, with ``flush``, no activation),
        replica 0's BN buffers everywhere."""
        if self.cross is not None:
            self.cross.drain(steps_done)
        if flush:
            self.link.flush()
        if self.group is not None:
            broadcast_buffers(self.parts, src=self.k, group=self.group)

    def agree(self, value: float) -> float:
        return agreed(value, self.engine.device)

    def stop_step(self, step: int, received: str | None) -> tuple[int, str] | None:
        return self.stopping.target(step, received)

    def reduce(self, figures: torch.Tensor, seconds: float) -> Reduced:
        """Per stage: mean loss, train seconds, idle seconds (replica 0) and the train_stat sum (all replicas);
        the run's wall time is the slowest stage's."""
        values, k = figures.tolist(), self.k
        stats = torch.zeros(self.engine.k, 4)
        if self.replica == 0:
            stats[k, :3] = torch.tensor([values[k] / max(1.0, values[-1]), seconds, self.link.idle - self.idle_mark])
        stats[k, 3] = values[-2]
        stats = stats.to(self.engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(stats)
        stats = stats.cpu()
        busy = ((stats[:, 1] - stats[:, 2]) / stats[:, 1].clamp(min=1e-9)).tolist()
        wall = max(stats[:, 1].max().item(), 1e-9)
        return Reduced(stats[:, 0].tolist(), stats[-1, 3].item(), wall, {"busy_fraction": busy})

    def evaluate(self) -> dict[str, Any]:
        engine = self.engine
        report = stage_evaluate(engine, self.k, self.test_loader, self.link, self.send_labels)
        self.link.flush()
        return gather_evaluation(engine.task, report, engine.k, self.replica)

    def save(self, position: dict[str, Any], carry: dict[str, Any] | None, name: str = "last") -> None:
        """Replica 0 writes the stage's checkpoint, with every replica's RNG state and, for ``carry``, every
        replica's figures of the unrecorded steps."""
        engine, k = self.engine, self.k
        rngs, stats = [torch.get_rng_state()], [None if carry is None else carry["stats"]]
        if self.group is not None:
            rngs, stats = [None] * self.replicas, [None] * self.replicas
            dist.all_gather_object(rngs, torch.get_rng_state(), group=self.group)
            if carry is not None:  # (every replica saves with the same arguments: the call is collective)
                dist.all_gather_object(stats, carry["stats"], group=self.group)
        if self.replica > 0:
            return
        shipping = None if self.cross is None else self.cross.shipping
        state = {
            "stage": k,
            **engine.stage_state_dict(k),
            **position,
            "rng_torch": rngs,
            "ema_sources": shipping.state_dict() if shipping is not None else None,
            "ends": engine.ends,
            "unrecorded": None if carry is None else {**carry, "stats": stats},
        }
        save_checkpoint(state, self.run_dir / stage_file(k, name))

    def load(self) -> dict[str, Any]:
        """Restore the stage; every stage must be at the same step."""
        engine, k = self.engine, self.k
        path = self.run_dir / f"ckpt_stage{k}.pt"
        state = load_checkpoint(path)
        if list(state["ends"]) != engine.ends or state["stage"] != k:
            raise ConfigError(
                f"{path}: stage {state['stage']} of split {state['ends']}, not stage {k} of split {engine.ends}"
            )
        engine.load_stage_state_dict(k, state)
        rngs = state["rng_torch"]
        torch.set_rng_state(rngs[self.replica % len(rngs)])
        if state.get("ema_sources") is not None and self.cross is not None and self.cross.shipping is not None:
            self.cross.shipping.load_state_dict(state["ema_sources"])
        carried = state.get("unrecorded")
        if carried is not None:
            carried["stats"] = carried["stats"][self.replica % len(carried["stats"])]
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, state["step"])
        if len(set(steps)) > 1:  # a crash between two stages' saves of a run.ckpt_every checkpoint
            raise ConfigError(
                f"{self.run_dir}: the stage checkpoints are at different steps {steps}; resume needs one step"
            )
        return state

    def environment(self) -> dict[str, Any]:
        env: dict[str, Any] = {"world_size": dist.get_world_size(), "replicas": self.replicas}
        if hasattr(os, "sched_getaffinity"):  # rank 0's CPU cores (one of its own with ppll.pin_cores)
            env["rank0_cores"] = sorted(os.sched_getaffinity(0))
        return env

    def close(self, steps_done: int) -> None:
        self.link.shutdown(steps_done)


def run_stage(cfg: TrainCfg, out_dir: str | None = None, resume: bool = False) -> dict[str, Any] | None:
    """The body of one rank (the process group must be initialised): build, then run the trainer on this stage.
    ``resume``: continue the run in ``out_dir`` from its per-stage checkpoints. Returns the metrics on rank 0."""
    return train_rank(StageRuntime, cfg, out_dir, resume)


def stage_file(stage: int, name: str = "last") -> str:
    """A PPLL stage's checkpoint file: ``ckpt_stage{k}.pt`` (the last), ``ckpt_best_stage{k}.pt``."""
    return f"ckpt_stage{stage}.pt" if name == "last" else f"ckpt_{name}_stage{stage}.pt"


def read_stage_checkpoints(run_dir: str | Path, name: str = "last") -> list[dict[str, Any]]:
    """Every stage checkpoint ``name`` (``last``, ``best``) of a PPLL run, in stage order, checked to form one model
    at one step (for ``locallearn eval`` and ``export``)."""
    prefix = stage_file(0, name).removesuffix("0.pt")
    paths = sorted(Path(run_dir).glob(f"{prefix}*.pt"), key=lambda p: int(p.stem.removeprefix(prefix)))
    states = [load_checkpoint(p) for p in paths]
    k = len(states[0]["ends"]) if states else 0
    if not states or [s["stage"] for s in states] != list(range(k)):
        found = [s["stage"] for s in states]
        raise ConfigError(f"{run_dir}: a PPLL run needs {prefix}0..{max(k, 1) - 1}.pt, found stages {found}")
    steps = [s["step"] for s in states]
    if len(set(steps)) > 1:
        raise ConfigError(
            f"{run_dir}: the stage checkpoints are at different steps {steps}; evaluate after a full save"
        )
    return states


def load_stages(engine: LocalEngine, states: list[dict[str, Any]]) -> None:
    """Put every stage's module and aux net (from :func:`read_stage_checkpoints`) into one single-process engine."""
    if list(states[0]["ends"]) != engine.ends:
        raise ConfigError(f"stage checkpoints split at {states[0]['ends']}, this config at {engine.ends}")
    for k, state in enumerate(states):
        engine.load_stage_state_dict(k, state, weights_only=True)


def spawn_ppll(
    cfg: TrainCfg, world: int | None = None, resume: str | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run PPLL with ``world`` (default ``ppll.procs``) local processes on loopback (tests, one machine), or
    continue the run directory ``resume``; returns rank 0's metrics. ``timeout``: seconds before every rank is
    killed (None: rely on ``ppll.timeout`` per message)."""
    out_dir = resume or str(new_run_dir(cfg.run.out, run_name(cfg)))
    return spawn(run_stage, cfg, world or cfg.ppll.procs, out_dir, resume is not None, timeout)


def fit_ppll(cfg: TrainCfg, resume: str | None = None) -> dict[str, Any] | None:
    """``locallearn train ... parallel=ppll``: under torchrun, join its process group; else spawn the ranks.
    ``resume``: a PPLL run directory (``cfg`` is then its merged config: :func:`locallearn.parallel.fit_parallel`)."""
    if "RANK" not in os.environ:
        if not cfg.ppll.procs:
            raise ConfigError("parallel=ppll needs torchrun (--nproc-per-node K) or ppll.procs=K to spawn locally")
        return spawn_ppll(cfg, resume=resume)
    return run_torchrun(run_stage, cfg, resume)
