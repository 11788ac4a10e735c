"""PPLL: pipeline-parallel local learning, one process per local module (spec methods.md §7, §10.2; pipeline.md
§1.4, §6).

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
on CPU (pipeline.md §1.4; tested for DGL and InfoPro, K = 2..4). Add-ons whose state crosses stages run with
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

Balance: ``method.balance: time`` is measured once on rank 0 and broadcast (:func:`~.launch.agreed_config`).
Timing: :class:`~.link.Link` counts the seconds a rank sits blocked, so each stage reports a busy fraction,
compute / wall (pipeline.md §6.4). :func:`bench_step` runs the same stage step on fixed batches for ``locallearn
bench pipeline``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..local.task import Batch
from ..models.units import detach_carry
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.config import ConfigError, TrainCfg, dump_config, to_dict
from ..train.engine import LocalEngine
from ..train.loop import build_engine, build_loaders, run_name
from ..train.rundir import MetricsLog, environment, new_run_dir
from ..train.schedule import lr_at
from .cross_stage import CrossStage, check_supported
from .data_parallel import GradAverager, broadcast_buffers, shard
from .launch import agreed_config, agreed_run_dir, name_ranks, new_group, rank_device, run_torchrun, spawn
from .link import TRAIN, Link, StageError
from .stage_eval import gather_evaluation, stage_evaluate

__all__ = [
    "Link",
    "StageError",
    "bench_step",
    "check_supported",
    "fit_ppll",
    "load_stages",
    "read_stage_checkpoints",
    "run_stage",
    "spawn_ppll",
    "stage_step",
]


def stage_step(
    engine: LocalEngine, k: int, x: torch.Tensor, batch: Batch, link: Link, step: int, cross: CrossStage | None = None
) -> torch.Tensor:
    """Module k on one batch: forward, send downstream at once, local backward, optimizer step. With ``cross``,
    the cross-stage messages of MAN/LAM and cascades happen at their documented points (:mod:`.cross_stage`);
    without it every loss stays on this stage (timing probes)."""
    opt = engine.optimizers[k]
    engine.backbone.train()
    engine.method.train()
    opt.zero_grad(set_to_none=True)
    cascade = None if cross is None else cross.cascade
    if cascade is not None:  # cascades reach back through this module's input
        x = detach_carry(x, k > 0)
    with engine.autocast():
        out = engine.forward_module(k, x)
        link.send(TRAIN, step, out)
        if cross is not None:
            cross.pull("loss", step)
        losses = engine.method.local_losses(k, out, batch)
    if cascade is None:  # (a timing probe of a cascade method: its two losses share the graph)
        for i, (loss, _) in enumerate(losses):
            (loss if engine.scaler is None else engine.scaler.scale(loss)).backward(retain_graph=i < len(losses) - 1)
            engine.stats[k] += loss.detach().float()
    else:
        cascade.own(step, losses, x)
    losses = None  # a cascade retained the graphs; the aux nets' part is walked by no later gradient: free it now
    if cross is not None:
        cross.pull("backward", step)
    engine.method.after_backward(k)
    if cascade is not None:
        cascade.downstream(step, x, out)
    engine.step_module(k)
    if engine.scaler is not None:
        engine.scaler.update()
    if cross is not None:
        cross.stepped(step)
    engine.method.after_iteration()
    return detach_carry(out)


def bench_step(
    engine: LocalEngine, batches: list[Batch], link: Link, send_labels: bool = False
) -> Callable[[int], None]:
    """This rank's training step ``i`` on ``batches[i % len]``: the loop body of :func:`run_stage` on fixed batches,
    for ``locallearn bench pipeline``. Every rank holds the same batches; with ``send_labels`` (``ppll.labels:
    send``) the stages after the first still take the targets from stage k-1's DATA messages, so their cost is
    timed. Every rank must call it (it creates the upstream process group when the method needs one)."""
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


class _Stage:
    """One rank's place in the mesh and its per-stage checkpoint (module doc)."""

    def __init__(self, cfg: TrainCfg, engine: LocalEngine, device: torch.device) -> None:
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
        name_ranks(lambda r: f"stage {r % k}" + (f" (replica {r // k})" if replicas > 1 else ""))
        self.replica = rank // k
        back = new_group(cfg) if CrossStage.needed(engine) else None
        groups = [new_group(cfg, [r * k + s for r in range(replicas)]) for s in range(k)] if replicas > 1 else []
        self.group = groups[self.k] if groups else None
        self.link = Link(rank, world, cfg.ppll.window, cfg.model.channels_last, device, stages=k, back=back)
        self.cross = CrossStage.build(engine, self.link, cfg.ppll.ema_every)
        if self.group is not None:
            engine.grad_sync = GradAverager(engine, self.group, self.link.name)
        aux = engine.method.aux[self.k]
        self.parts = [engine.modules[self.k]] + ([] if aux is None else [aux])
        self.send_labels = cfg.ppll.labels == "send"
        self.reads_data = self.k == 0 or not self.send_labels

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

    def sync(self, steps_done: int, flush: bool = True) -> None:
        """Before an evaluation or a checkpoint: no weight message in flight (and, with ``flush``, no activation),
        replica 0's BN buffers everywhere."""
        if self.cross is not None:
            self.cross.drain(steps_done)
        if flush:
            self.link.flush()
        if self.group is not None:
            broadcast_buffers(self.parts, src=self.k, group=self.group)

    def save(self, path: Path, epoch: int, in_epoch: int, step: int, unrecorded: dict[str, Any] | None = None) -> None:
        """Replica 0 writes the stage's checkpoint, with every replica's RNG state and, for ``unrecorded`` (this
        rank's seconds, idle seconds and steps since the last record), every replica's statistics of those steps:
        an epoch continued after an interruption then records all of its steps."""
        engine, k = self.engine, self.k
        rngs, stats = [torch.get_rng_state()], [engine.stats.cpu()]
        if self.group is not None:
            rngs, stats = [None] * self.replicas, [None] * self.replicas
            dist.all_gather_object(rngs, torch.get_rng_state(), group=self.group)
            if unrecorded is not None:  # (every replica saves with the same arguments: the call is collective)
                dist.all_gather_object(stats, engine.stats.cpu(), group=self.group)
        if self.replica > 0:
            return
        shipping = None if self.cross is None or self.cross.shipping is None else self.cross.shipping
        state = {
            "stage": k,
            "model": engine.modules[k].state_dict(),
            "aux": self.parts[1].state_dict() if len(self.parts) > 1 else {},
            "optim": engine.optimizers[k].state_dict(),
            "scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
            "rng_torch": rngs,
            "ema_sources": shipping.state_dict() if shipping is not None else None,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "step": step,
            "ends": engine.ends,
            "config": to_dict(self.cfg),
            "unrecorded": None if unrecorded is None else {**unrecorded, "stats": stats},
        }
        save_checkpoint(state, path)

    def load(self, path: Path) -> tuple[int, int, int, dict[str, Any] | None]:
        """Restore the stage; returns epoch, step in epoch, step and this rank's unrecorded seconds, idle seconds
        and steps (None if the checkpoint has none: the epoch then records its resumed part)."""
        engine, k, state = self.engine, self.k, load_checkpoint(path)
        if list(state["ends"]) != engine.ends or state["stage"] != k:
            raise ConfigError(
                f"{path}: stage {state['stage']} of split {state['ends']}, not stage {k} of split {engine.ends}"
            )
        engine.modules[k].load_state_dict(state["model"])
        if len(self.parts) > 1:
            self.parts[1].load_state_dict(state["aux"])
        engine.optimizers[k].load_state_dict(state["optim"])
        if engine.scaler is not None and state.get("scaler"):
            engine.scaler.load_state_dict(state["scaler"])
        rngs = state["rng_torch"]
        torch.set_rng_state(rngs[self.replica % len(rngs)])
        if state.get("ema_sources") is not None and self.cross is not None and self.cross.shipping is not None:
            self.cross.shipping.load_state_dict(state["ema_sources"])
        carried = state.get("unrecorded")
        if carried is not None:
            engine.stats.copy_(carried["stats"][self.replica % len(carried["stats"])])
        return state["epoch"], state["step_in_epoch"], state["step"], carried


def run_stage(cfg: TrainCfg, out_dir: str | None = None, resume: bool = False) -> dict[str, Any] | None:
    """The body of one rank (the process group must be initialised). ``resume``: continue the run in
    ``out_dir`` from its per-stage checkpoints. Returns the metrics on rank 0."""
    device = rank_device(cfg)
    train_loader, test_loader, spec = build_loaders(cfg, device)
    cfg = agreed_config(cfg, spec, device, train_loader)
    engine = build_engine(cfg, spec, device, next(iter(test_loader))[0][: cfg.data.batch_size])
    me = _Stage(cfg, engine, device)
    k, link, rank = me.k, me.link, dist.get_rank()
    run_dir = agreed_run_dir(cfg, out_dir, run_name(cfg) + "_ppll", device)
    epoch = in_epoch = step = 0
    unrecorded = None  # seconds, idle seconds and steps since the last record, from a checkpoint
    if resume:
        epoch, in_epoch, step, unrecorded = me.load(run_dir / f"ckpt_stage{k}.pt")
        steps = [None] * dist.get_world_size()
        dist.all_gather_object(steps, step)
        if len(set(steps)) > 1:  # a crash between two stages' saves of a run.ckpt_every checkpoint
            raise ConfigError(f"{run_dir}: the stage checkpoints are at different steps {steps}; resume needs one step")
    elif rank == 0:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    log = MetricsLog(run_dir / "metrics.jsonl", cfg.log.tensorboard) if rank == 0 else None
    if rank == 0:
        env = {**environment(device), "world_size": dist.get_world_size(), "replicas": me.replicas}
        if hasattr(os, "sched_getaffinity"):  # rank 0's CPU cores (one of its own with ppll.pin_cores)
            env["rank0_cores"] = sorted(os.sched_getaffinity(0))
        (run_dir / "env.json").write_text(json.dumps(env, indent=2))
    ckpt = run_dir / f"ckpt_stage{k}.pt"
    spe, result, stop = len(train_loader), None, False
    while epoch < cfg.run.epochs and not stop:
        carried = unrecorded or {"seconds": 0.0, "idle": 0.0, "steps": 0}
        start, idle, done = time.perf_counter() - carried["seconds"], link.idle - carried["idle"], carried["steps"]
        unrecorded = None
        own_data = train_loader.batches(epoch, in_epoch) if me.reads_data else [None] * (spe - in_epoch)
        for item in own_data:
            engine.set_lr(lr_at(cfg.optim, epoch, in_epoch, spe, cfg.run.epochs))
            batch, weight = me.batch(item, step)
            if engine.grad_sync is not None:
                engine.grad_sync.weight = weight
            x = batch.input if k == 0 else link.recv(TRAIN, step)[2]
            out = stage_step(engine, k, x, batch, link, step, me.cross)
            if k == engine.k - 1:  # the final output's training metric (top-1 hits, PSNR), summed on the device
                engine.stats[-2] += engine.task.train_stat(out, batch)
            in_epoch, step, done = in_epoch + 1, step + 1, done + 1
            if cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0:
                me.sync(step, flush=False)  # activations in flight need not land: a resume recomputes them
                seconds, idle_s = time.perf_counter() - start, link.idle - idle
                me.save(ckpt, epoch, in_epoch, step, {"seconds": seconds, "idle": idle_s, "steps": done})
            if cfg.run.max_steps and step >= cfg.run.max_steps:
                stop = True
                break
        me.sync(step)
        train_time, idle = time.perf_counter() - start, link.idle - idle
        seen = min(in_epoch * cfg.data.batch_size, train_loader.n) - (in_epoch - done) * cfg.data.batch_size
        if in_epoch == spe:
            epoch, in_epoch = epoch + 1, 0
        evaluate = in_epoch == 0 and (epoch % cfg.run.eval_every == 0 or epoch == cfg.run.epochs) or stop
        report = stage_evaluate(engine, k, test_loader, link, cfg.ppll.labels == "send") if evaluate else None
        link.flush()
        tests = gather_evaluation(engine.task, report, engine.k, me.replica) if evaluate else {}
        stats = torch.zeros(engine.k, 4)  # per stage: mean loss, train seconds, idle, train_stat sum (all replicas)
        if me.replica == 0:
            stats[k, :3] = torch.tensor([engine.stats[k].item() / max(1, done), train_time, idle])
        stats[k, 3] = engine.stats[-2].item()
        engine.stats.zero_()
        stats = stats.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(stats)
        stats = stats.cpu()
        me.save(ckpt, epoch, in_epoch, step)
        if rank == 0:
            wall = max(stats[:, 1].max().item(), 1e-9)
            record: dict[str, Any] = {
                "epoch": epoch + (1 if in_epoch else 0),
                "step": step,
                "lr": engine.optimizers[k].param_groups[0]["lr"],
                "train_loss": stats[:, 0].tolist(),
                f"train_{engine.task.headline}": stats[-1, 3].item() / max(1, seen),
                "epoch_time_s": wall,
                "imgs_per_s": seen / wall,
                "train_size": train_loader.n,
                "busy_fraction": ((stats[:, 1] - stats[:, 2]) / stats[:, 1].clamp(min=1e-9)).tolist(),
                **tests,
            }
            log.log(record)
            metric = f"test_{engine.task.headline}"
            test = f" {metric} {record[metric]:.4f}" if metric in record else ""
            print(f"[ppll] epoch {record['epoch']} step {step}{test} {record['imgs_per_s']:.0f} img/s", flush=True)
            result = {**record, "run_dir": str(run_dir), "ends": engine.ends}
    if log is not None:
        log.close()
    link.shutdown(step)
    return result


def read_stage_checkpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``ckpt_stage{k}.pt`` of a PPLL run, in stage order, checked to form one model at one step (for
    ``locallearn eval``)."""
    paths = sorted(Path(run_dir).glob("ckpt_stage*.pt"), key=lambda p: int(p.stem.removeprefix("ckpt_stage")))
    states = [load_checkpoint(p) for p in paths]
    k = len(states[0]["ends"]) if states else 0
    if not states or [s["stage"] for s in states] != list(range(k)):
        found = [s["stage"] for s in states]
        raise ConfigError(f"{run_dir}: a PPLL run needs ckpt_stage0..{max(k, 1) - 1}.pt, found stages {found}")
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
        engine.modules[k].load_state_dict(state["model"])
        if engine.method.aux[k] is not None:
            engine.method.aux[k].load_state_dict(state["aux"])


def spawn_ppll(
    cfg: TrainCfg, world: int | None = None, resume: str | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run PPLL with ``world`` (default ``ppll.procs``) local processes on loopback (tests, one machine), or
    continue the run directory ``resume``; returns rank 0's metrics. ``timeout``: seconds before every rank is
    killed (None: rely on ``ppll.timeout`` per message)."""
    out_dir = resume or str(new_run_dir(cfg.run.out, run_name(cfg) + "_ppll"))
    return spawn(run_stage, cfg, world or cfg.ppll.procs, out_dir, resume is not None, timeout)


def fit_ppll(cfg: TrainCfg, resume: str | None = None) -> dict[str, Any] | None:
    """``locallearn train ... parallel=ppll``: under torchrun, join its process group; else spawn the ranks.
    ``resume``: a PPLL run directory (``cfg`` is then its merged config: :func:`locallearn.parallel.fit_parallel`)."""
    if "RANK" not in os.environ:
        if not cfg.ppll.procs:
            raise ConfigError("parallel=ppll needs torchrun (--nproc-per-node K) or ppll.procs=K to spawn locally")
        return spawn_ppll(cfg, resume=resume)
    return run_torchrun(run_stage, cfg, resume)
