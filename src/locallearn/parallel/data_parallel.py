"""Data-parallel local learning (``parallel: dp``), and the gradient averaging that PPLL's replicated stages share
(docs/pipeline.md, "Data-parallel local learning and replicated pipelines": why one all-reduce per module).

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

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..tasks.task import Batch
from ..train.build import run_name
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.config import ConfigError, TrainCfg
from ..train.engine import LocalEngine, StepResult
from ..train.rundir import new_run_dir
from ..train.runtime import Reduced
from .launch import (
    StopAgreement,
    agreed,
    agreed_run_dir,
    name_ranks,
    run_torchrun,
    spawn,
    train_rank,
)
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


class ReplicaRuntime:
    """The trainer's runtime on one data-parallel rank: its shard of every global batch, gradients averaged by
    :class:`GradAverager`, figures reduced over the replicas, rank 0's ``ckpt_last.pt`` (module doc)."""

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
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.engine, self.train_loader, self.test_loader = engine, train_loader, test_loader
        name_ranks(lambda r: f"data-parallel rank {r}")
        self.averager = GradAverager(engine, name=f"data-parallel rank {self.rank}")
        engine.grad_sync = self.averager
        self.writes, self.label = self.rank == 0, f"[dp × {self.world}] "
        self.run_dir = agreed_run_dir(cfg, out_dir, run_name(cfg), device)
        self.parts = [engine.backbone, engine.method]
        self.stopping = StopAgreement(margin=2)  # every step's all-reduce keeps replicas within one step

    def batches(self, epoch: int, start: int) -> Iterable[Any]:
        return self.train_loader.batches(epoch, start)

    def step(self, item: Any, step: int) -> StepResult:
        part, self.averager.weight = shard(Batch(*item), self.rank, self.world)
        return self.engine.train_step(part)

    def begin_epoch(self, carried: dict[str, Any]) -> None:
        pass

    def carry(self) -> dict[str, Any]:
        return {}

    def sync(self, steps_done: int, flush: bool = True) -> None:
        broadcast_buffers(self.parts)  # BN running statistics drift apart: rank 0's everywhere

    def agree(self, value: float) -> float:
        return agreed(value, self.engine.device)

    def stop_step(self, step: int, received: str | None) -> tuple[int, str] | None:
        return self.stopping.target(step, received)

    def reduce(self, figures: torch.Tensor, seconds: float) -> Reduced:
        """Loss: the mean over replicas of each shard's mean; the train stat: a sum over every sample."""
        values = figures.tolist()
        steps = max(values[-1], 1.0)
        totals = torch.tensor([*(v / steps for v in values[:-2]), values[-2]], dtype=torch.float64)
        totals = totals.to(self.engine.device)  # NCCL reduces device tensors only
        dist.all_reduce(totals)
        totals = totals.cpu()
        return Reduced((totals[:-1] / self.world).tolist(), totals[-1].item(), seconds, {"world_size": self.world})

    def evaluate(self) -> dict[str, Any]:
        return self.engine.evaluate(self.test_loader.batches())  # every rank: identical, none idles into a timeout

    def save(self, position: dict[str, Any], carry: dict[str, Any] | None, name: str = "last") -> None:
        """Rank 0 writes ``ckpt_last.pt``; ``carry`` keeps every rank's figures, so each resumes with its own."""
        if carry is not None:
            stats: list[Any] = [None] * self.world
            dist.all_gather_object(stats, carry["stats"])
            carry = {**carry, "stats": stats}
        if self.rank == 0:
            state = {**self.engine.state_dict(), **position, "rng_torch": torch.get_rng_state(), "unrecorded": carry}
            save_checkpoint(state, self.run_dir / f"ckpt_{name}.pt")
        dist.barrier()

    def load(self) -> dict[str, Any]:
        state = load_checkpoint(self.run_dir / "ckpt_last.pt")
        self.engine.load_state_dict(state)
        torch.set_rng_state(state["rng_torch"])
        carried = state.get("unrecorded")
        if carried and len(carried["stats"]) == self.world:  # (a resume on another number of ranks drops it)
            state["unrecorded"] = {**carried, "stats": carried["stats"][self.rank]}
        else:
            state["unrecorded"] = None
        return state

    def environment(self) -> dict[str, Any]:
        return {"world_size": self.world}

    def close(self, steps_done: int) -> None:
        pass


def run_dp(cfg: TrainCfg, out_dir: str | None = None, resume: bool = False) -> dict[str, Any] | None:
    """The body of one data-parallel rank (process group initialised): build, then run the trainer on this
    replica; returns the metrics on rank 0."""
    return train_rank(ReplicaRuntime, cfg, out_dir, resume)


def fit_dp(cfg: TrainCfg, resume: str | None = None) -> dict[str, Any] | None:
    """``locallearn train ... parallel=dp``: under torchrun, join its process group; else spawn ``ppll.procs``."""
    if cfg.parallel != "dp":
        raise ConfigError(f"fit_dp runs parallel=dp configs, got parallel={cfg.parallel}")
    if "RANK" not in os.environ:
        if not cfg.ppll.procs:
            raise ConfigError("parallel=dp needs torchrun (--nproc-per-node W) or ppll.procs=W to spawn locally")
        out_dir = resume or str(new_run_dir(cfg.run.out, run_name(cfg)))  # (named in a failure's line)
        return spawn(run_dp, cfg, cfg.ppll.procs, out_dir, resume is not None)
    return run_torchrun(run_dp, cfg, resume)
