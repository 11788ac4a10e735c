"""Data-parallel local learning (``parallel: dp``), and the gradient averaging that PPLL's replicated stages share
(spec methods.md §10.2 ``DDP`` integration, "all-reduce manually per stage"; pipeline.md §6).

    torchrun --nproc-per-node 8 -m locallearn train -c configs/imagenet/resnet34_infopro_k4.yaml parallel=dp
    locallearn train -c configs/fmnist/demo.yaml parallel=dp ppll.procs=2     # spawns the ranks itself

Every rank runs the single-process :class:`~locallearn.train.engine.LocalEngine` on its shard of every global
batch. All ranks read the identically seeded loader (the batch is a pure function of seed, epoch and index), so
nothing but gradients crosses the wire; replica r of R takes ``tensor_split(R)[r]`` of the batch (sizes differ by at
most one). Right before module k's optimizer step the engine calls its ``grad_sync`` hook: :class:`GradAverager`
flattens module k's (and its aux net's) gradients into one tensor, scales it by n_r / N (this shard's share of
the batch) and sums it over the replicas with one ``all_reduce``. For a loss that is a per-sample mean this is
exactly the gradient of the global batch, even for a ragged last batch, so R ranks match one process on the
global batch up to the summation order (tested: 1e-6 on a BatchNorm-free ViT with DGL). Two things make replicas
differ from one big batch, as in DDP without SyncBN: **BatchNorm batch statistics are per rank** (each normalises
its own shard), and batch-level losses (InfoPro's contrastive loss) see only the shard.

Rank 0 logs and writes ``ckpt_last.pt`` (the single-process format: ``locallearn eval`` reads it, ``--resume``
continues it). BN running statistics drift apart across ranks, so rank 0's buffers are broadcast to all ranks
before every evaluation and checkpoint; every rank then evaluates the whole test set (identical results, no rank
idles into a timeout). ``ppll.procs`` and ``ppll.timeout`` set the spawned processes and the peer timeout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..local.task import Batch
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.config import ConfigError, TrainCfg, dump_config, to_dict
from ..train.engine import LocalEngine
from ..train.loop import build_engine, build_loaders, run_name
from ..train.rundir import MetricsLog, environment
from ..train.schedule import lr_at
from .launch import agreed_config, agreed_run_dir, name_ranks, rank_device, run_torchrun, spawn
from .link import StageError, short_error


def shard(batch: Batch, index: int, count: int) -> tuple[Batch, float]:
    """Replica ``index`` of ``count``'s part of a global batch, and its share n_r / N of the samples."""
    if count == 1:
        return batch, 1.0
    if len(batch) < count:
        raise ConfigError(f"a batch of {len(batch)} samples cannot feed {count} replicas; raise data.batch_size")
    parts = [None if t is None else t.tensor_split(count)[index] for t in (batch.input, batch.target, batch.raw)]
    return Batch(*parts), len(parts[1]) / len(batch)


class GradAverager:
    """``engine.grad_sync``: module k's gradients, weighted by this replica's share, summed over ``group``."""

    def __init__(self, engine: LocalEngine, group: Any = None, name: str = "data-parallel rank") -> None:
        self.engine, self.group, self.name = engine, group, name
        self.weight = 1.0  # n_r / N of the current step

    def __call__(self, k: int) -> None:
        grads = [p.grad for p in self.engine.module_parameters(k) if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self.weight)
        try:
            dist.all_reduce(flat, group=self.group)
        except RuntimeError as e:
            raise StageError(
                f"{self.name}: gradient all-reduce of module {k} failed, a replica died or stopped answering "
                f"({short_error(e)})"
            ) from None
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view(g.shape))
            offset += g.numel()


def broadcast_buffers(modules: list[nn.Module], src: int = 0, group: Any = None) -> None:
    """Every floating buffer (BN running statistics) from rank ``src`` of ``group``, in place."""
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src, group=group)


def _checkpoint(
    engine: LocalEngine,
    cfg: TrainCfg,
    path: Path,
    epoch: int,
    in_epoch: int,
    step: int,
    unrecorded: dict[str, Any] | None = None,
) -> None:
    state = {**engine.state_dict(), "config": to_dict(cfg), "epoch": epoch, "step_in_epoch": in_epoch, "step": step}
    save_checkpoint({**state, "rng_torch": torch.get_rng_state(), "unrecorded": unrecorded}, path)


def _unrecorded(engine: LocalEngine, seconds: float, steps: int) -> dict[str, Any]:
    """The steps since the last record, for rank 0's checkpoint (every rank calls it: one all-gather), with every
    rank's statistics of them, so each rank resumes with its own (a resume on another number of ranks does not)."""
    stats: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(stats, engine.stats.cpu())
    return {"seconds": seconds, "steps": steps, "stats": stats}


def run_dp(cfg: TrainCfg, out_dir: str | None = None, resume: bool = False) -> dict[str, Any] | None:
    """The body of one data-parallel rank (process group initialised); returns the metrics on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device(cfg)
    train_loader, test_loader, spec = build_loaders(cfg, device)
    cfg = agreed_config(cfg, spec, device, train_loader)
    engine = build_engine(cfg, spec, device, next(iter(test_loader))[0][: cfg.data.batch_size])
    name_ranks(lambda r: f"data-parallel rank {r}")
    sync = GradAverager(engine, name=f"data-parallel rank {rank}")
    engine.grad_sync = sync
    run_dir = agreed_run_dir(cfg, out_dir, run_name(cfg) + "_dp", device)
    epoch = in_epoch = step = 0
    unrecorded: dict[str, Any] = {"seconds": 0.0, "steps": 0}  # steps since the last record
    if resume:
        state = load_checkpoint(run_dir / "ckpt_last.pt")
        engine.load_state_dict(state)
        epoch, in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        torch.set_rng_state(state["rng_torch"])
        carried = state.get("unrecorded")  # (checkpoints from before they were kept have none)
        if carried and len(carried["stats"]) == world:
            unrecorded = carried
            engine.stats.copy_(carried["stats"][rank])
    elif rank == 0:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    log = MetricsLog(run_dir / "metrics.jsonl", cfg.log.tensorboard) if rank == 0 else None
    if rank == 0:
        (run_dir / "env.json").write_text(json.dumps({**environment(device), "world_size": world}, indent=2))
    parts = [engine.backbone, engine.method]
    spe, result, stop = len(train_loader), None, False
    while epoch < cfg.run.epochs and not stop:
        start, done = time.perf_counter() - unrecorded["seconds"], unrecorded["steps"]
        unrecorded = {"seconds": 0.0, "steps": 0}
        for x, y, raw in train_loader.batches(epoch, in_epoch):
            engine.set_lr(lr_at(cfg.optim, epoch, in_epoch, spe, cfg.run.epochs))
            part, sync.weight = shard(Batch(x, y, raw), rank, world)
            engine.train_step(part)
            in_epoch, step, done = in_epoch + 1, step + 1, done + 1
            if cfg.run.ckpt_every and step % cfg.run.ckpt_every == 0:
                broadcast_buffers(parts)
                carried = _unrecorded(engine, time.perf_counter() - start, done)
                if rank == 0:
                    _checkpoint(engine, cfg, run_dir / "ckpt_last.pt", epoch, in_epoch, step, carried)
            if cfg.run.max_steps and step >= cfg.run.max_steps:
                stop = True
                break
        train_time = time.perf_counter() - start
        stats = engine.pop_train_stats()
        totals = torch.tensor([*stats["train_loss"], stats["train_stat_sum"]], dtype=torch.float64, device=device)
        dist.all_reduce(totals)  # loss: mean over replicas of the shard means; the stat: a sum over samples
        totals = totals.cpu()
        seen = min(in_epoch * cfg.data.batch_size, train_loader.n) - (in_epoch - done) * cfg.data.batch_size
        if in_epoch == spe:
            epoch, in_epoch = epoch + 1, 0
        record: dict[str, Any] = {
            "epoch": epoch + (1 if in_epoch else 0),
            "step": step,
            "lr": engine.optimizers[0].param_groups[0]["lr"],
            "train_loss": (totals[:-1] / world).tolist(),
            f"train_{engine.task.headline}": totals[-1].item() / max(1, seen),
            "epoch_time_s": train_time,
            "imgs_per_s": seen / max(train_time, 1e-9),
            "train_size": train_loader.n,
            "world_size": world,
        }
        broadcast_buffers(parts)
        if in_epoch == 0 and (epoch % cfg.run.eval_every == 0 or epoch == cfg.run.epochs) or stop:
            record.update(engine.evaluate(test_loader.batches()))
        if rank == 0:
            _checkpoint(engine, cfg, run_dir / "ckpt_last.pt", epoch, in_epoch, step)
            log.log(record)
            metric = f"test_{engine.task.headline}"
            acc = f" {metric} {record[metric]:.4f}" if metric in record else ""
            print(f"[dp×{world}] epoch {record['epoch']} step {step}{acc} {record['imgs_per_s']:.0f} img/s", flush=True)
            result = {**record, "run_dir": str(run_dir), "ends": list(engine.ends)}
        dist.barrier()
    if log is not None:
        log.close()
    return result


def fit_dp(cfg: TrainCfg, resume: str | None = None) -> dict[str, Any] | None:
    """``locallearn train ... parallel=dp``: under torchrun, join its process group; else spawn ``ppll.procs``."""
    if cfg.parallel != "dp":
        raise ConfigError(f"fit_dp runs parallel=dp configs, got parallel={cfg.parallel}")
    if "RANK" not in os.environ:
        if not cfg.ppll.procs:
            raise ConfigError("parallel=dp needs torchrun (--nproc-per-node W) or ppll.procs=W to spawn locally")
        return spawn(run_dp, cfg, cfg.ppll.procs, resume, resume is not None)
    return run_torchrun(run_dp, cfg, resume)
