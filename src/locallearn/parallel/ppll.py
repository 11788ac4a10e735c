"""PPLL: pipeline-parallel local learning, one process per local module (spec methods.md §7, §10.2).

    torchrun --nproc-per-node 4 -m locallearn train -c configs/fmnist/demo.yaml parallel=ppll
    locallearn train -c configs/fmnist/demo.yaml parallel=ppll ppll.procs=4      # spawns the ranks itself

Rank k owns local module k, its aux net and its optimizer. Per batch it receives module k-1's detached output,
runs forward, sends its own detached output downstream *before* its backward (early forwarding), then does its
local backward and optimizer step. No gradient ever travels back, so stages work concurrently with no flush.
Labels and the raw image come from each rank's own, identically seeded loader (the data stream is a pure
function of seed, epoch and batch index), so only activations cross the wire.

Semantics: module k+1 sees, for batch t, module k's output computed with module k's parameters after t-1 steps —
exactly what the sequential engine does — so PPLL gives bitwise the same parameters as sequential local learning
on CPU (tested). Methods whose losses reach across modules (cascades) or read a neighbour's weights (MAN/LAM EMA
of the next module's unit) are refused for now with a clear error.

Protocol: every message is a header (int64: kind, step, ndim, shape...) then the payload. Kinds: TRAIN, EVAL,
STOP. A step id that does not match the receiver's is an error, never silent misalignment. Sends are ``isend``s
with at most ``ppll.window`` in flight (back-pressure). A peer that stops answering makes ``recv`` time out after
``ppll.timeout`` seconds; the rank then exits non-zero naming the stage it waited for.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..local.task import Batch
from ..train.checkpoint import save_checkpoint
from ..train.config import ConfigError, TrainCfg, config_from_dict, dump_config, to_dict
from ..train.engine import LocalEngine
from ..train.loop import build_engine, build_loaders, resolve_device, run_name
from ..train.rundir import MetricsLog, environment, new_run_dir
from ..train.schedule import lr_at

TRAIN, EVAL, STOP = 0, 1, 2
HEADER = 8  # kind, step, ndim, up to 5 dims


class StageError(RuntimeError):
    """A pipeline peer failed or stopped answering (one line: which stage, what happened)."""


def _header(kind: int, step: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
    if len(shape) > HEADER - 3:
        raise ValueError(f"PPLL sends activations of at most {HEADER - 3} dims, got shape {shape}")
    return torch.tensor([kind, step, len(shape), *shape] + [0] * (HEADER - 3 - len(shape)), dtype=torch.int64)


class Link:
    """Point-to-point traffic of one rank: receive from k-1, send to k+1, with a bounded send window."""

    def __init__(self, rank: int, world: int, window: int, channels_last: bool, device: torch.device) -> None:
        self.rank, self.world, self.window, self.channels_last = rank, world, max(1, window), channels_last
        self.device = device  # NCCL moves CUDA tensors; gloo on CPU moves CPU tensors
        self.pending: list[Any] = []

    def send(self, kind: int, step: int, tensor: torch.Tensor | None = None) -> None:
        if self.rank == self.world - 1:
            return
        payload = None if tensor is None else tensor.detach().contiguous()
        header = _header(kind, step, () if payload is None else tuple(payload.shape)).to(self.device)
        self.pending.append((dist.isend(header, self.rank + 1), header))
        if payload is not None:
            self.pending.append((dist.isend(payload, self.rank + 1), payload))  # keep the buffer alive
        while len(self.pending) > 2 * self.window:  # back-pressure: at most `window` messages in flight
            self._wait(self.pending.pop(0)[0])

    def recv(self, expect_kind: int | None, expect_step: int | None) -> tuple[int, int, torch.Tensor | None]:
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        try:
            dist.recv(header, self.rank - 1)
            kind, step, ndim = (int(v) for v in header[:3])
            payload = None
            if kind != STOP:
                payload = torch.empty(tuple(int(v) for v in header[3 : 3 + ndim]), device=self.device)
                dist.recv(payload, self.rank - 1)
        except RuntimeError as e:
            raise StageError(
                f"stage {self.rank}: stage {self.rank - 1} stopped answering ({str(e).splitlines()[0]})"
            ) from None
        if expect_kind is not None and (kind, step) != (expect_kind, expect_step):
            raise StageError(
                f"stage {self.rank}: expected message ({expect_kind}, step {expect_step}) from stage "
                f"{self.rank - 1}, got ({kind}, step {step}); the ranks' configs differ"
            )
        if payload is not None and payload.dim() == 4 and self.channels_last:
            payload = payload.contiguous(memory_format=torch.channels_last)
        return kind, step, payload

    def flush(self) -> None:
        for item in self.pending:
            self._wait(item[0])
        self.pending.clear()

    def _wait(self, work: Any) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise StageError(
                f"stage {self.rank}: stage {self.rank + 1} stopped receiving ({str(e).splitlines()[0]})"
            ) from None


def check_supported(engine: LocalEngine) -> None:
    if engine.method.max_reach > 1:
        raise ConfigError(
            "PPLL does not run cascades yet (their gradient crosses stages); drop 'cascade' "
            "from method.addons or train without parallel=ppll"
        )
    if any(a in engine.method.cfg.addons for a in ("man", "lam")):
        raise ConfigError(
            "PPLL does not yet ship the next stage's weights to MAN/LAM EMA copies; drop 'man'/'lam' "
            "from method.addons or train without parallel=ppll"
        )


def stage_step(engine: LocalEngine, k: int, x: torch.Tensor, batch: Batch, link: Link, step: int) -> torch.Tensor:
    """Module k on one batch: forward, send downstream at once, local backward, optimizer step."""
    module, opt = engine.modules[k], engine.optimizers[k]
    engine.backbone.train()
    engine.method.train()
    opt.zero_grad(set_to_none=True)
    with engine._autocast():
        out = module(x)
        link.send(TRAIN, step, out)
        losses = engine.method.local_losses(k, out, batch)
    for loss, _ in losses:
        (loss if engine.scaler is None else engine.scaler.scale(loss)).backward()
        engine._stats[k] += loss.detach().float()
    engine.method.after_backward(k)
    engine._step(k)
    if engine.scaler is not None:
        engine.scaler.update()
    engine.method.after_iteration()
    return out.detach()


@torch.no_grad()
def stage_evaluate(engine: LocalEngine, k: int, loader, link: Link, epoch: int) -> torch.Tensor:
    """Forward-only chain: counts of correct aux (or final) predictions of stage k, and samples seen."""
    engine.backbone.eval()
    engine.method.eval()
    counts = torch.zeros(2)
    for i, (x, y, raw) in enumerate(loader.batches()):
        if k > 0:
            _, _, x = link.recv(EVAL, i)
        with engine._autocast():
            h = engine.modules[k](x)
            link.send(EVAL, i, h)
            logits = h if k == engine.k - 1 else engine.method.aux_logits(k, h)
            if logits is not None:
                counts[0] += engine.task.correct(logits, Batch(x, y, raw)).float().cpu()
        counts[1] += len(y)
    return counts


def run_stage(cfg: TrainCfg, out_dir: str | None = None) -> dict[str, Any] | None:
    """The body of one rank (the process group must be initialised). Returns the metrics on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    train_loader, test_loader, spec = build_loaders(cfg, device)
    engine = build_engine(cfg, spec, device, next(iter(test_loader))[0][: cfg.data.batch_size])
    if engine.k != world:
        raise ConfigError(
            f"PPLL runs one process per module: K={engine.k} modules but {world} processes; "
            f"launch with --nproc-per-node {engine.k} (or ppll.procs={engine.k})"
        )
    check_supported(engine)
    link = Link(rank, world, cfg.ppll.window, cfg.model.channels_last, device)
    # Rank 0 names the run directory and tells the others, so every stage writes into the same one.
    names = [out_dir or (str(new_run_dir(cfg.run.out, run_name(cfg) + "_ppll")) if rank == 0 else None)]
    dist.broadcast_object_list(names, src=0)
    run_dir = Path(names[0])
    log = MetricsLog(run_dir / "metrics.jsonl") if rank == 0 else None
    if rank == 0:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "env.json").write_text(json.dumps({**environment(device), "world_size": world}, indent=2))
    steps_per_epoch, step, result = len(train_loader), 0, None
    for epoch in range(cfg.run.epochs):
        start = time.perf_counter()
        for i, (x, y, raw) in enumerate(train_loader.batches(epoch)):
            engine.set_lr(lr_at(cfg.optim, epoch, i, steps_per_epoch, cfg.run.epochs))
            if rank > 0:
                _, _, x = link.recv(TRAIN, step)
            stage_step(engine, rank, x, Batch(x, y, raw), link, step)
            step += 1
            if cfg.run.max_steps and step >= cfg.run.max_steps:
                break
        link.flush()
        train_time = time.perf_counter() - start
        counts = stage_evaluate(engine, rank, test_loader, link, epoch)
        link.flush()
        stats = torch.zeros(world, 4)  # per stage: mean loss, eval correct, eval seen, train seconds
        steps_done = max(1, min(step - epoch * steps_per_epoch, steps_per_epoch))
        stats[rank] = torch.tensor([engine._stats[rank].item() / steps_done, counts[0], counts[1], train_time])
        engine._stats.zero_()
        dist.all_reduce(stats)
        save_checkpoint(
            {
                "stage": rank,
                "model": {n: t for n, t in engine.modules[rank].state_dict().items()},
                "aux": engine.method.aux[rank].state_dict() if engine.method.aux[rank] is not None else {},
                "optim": engine.optimizers[rank].state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "ends": engine.ends,
                "config": to_dict(cfg),
            },
            run_dir / f"ckpt_stage{rank}.pt",
        )
        if rank == 0:
            seen = min(step, (epoch + 1) * steps_per_epoch) * cfg.data.batch_size
            record = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": stats[:, 0].tolist(),
                "test_acc": (stats[-1, 1] / stats[-1, 2]).item(),
                "aux_acc": [(s[1] / s[2]).item() if s[1] > 0 else None for s in stats[:-1]],
                "epoch_time_s": stats[:, 3].max().item(),
                "imgs_per_s": min(seen, train_loader.n) / max(stats[:, 3].max().item(), 1e-9)
                if epoch == 0
                else train_loader.n / max(stats[:, 3].max().item(), 1e-9),
                "busy_fraction": (stats[:, 3] / stats[:, 3].max()).tolist(),
            }
            log.log(record)
            print(
                f"[ppll] epoch {epoch + 1} step {step} test_acc {record['test_acc']:.4f} "
                f"{record['imgs_per_s']:.0f} img/s",
                flush=True,
            )
            result = {**record, "run_dir": str(run_dir), "ends": engine.ends}
        if cfg.run.max_steps and step >= cfg.run.max_steps:
            break
    if rank > 0:  # orderly shutdown: STOP travels down the pipe, so no rank exits with a send in flight
        link.recv(STOP, step)
    link.send(STOP, step)
    link.flush()
    dist.barrier()
    return result


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, data: dict[str, Any], out_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = config_from_dict(data)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=cfg.ppll.timeout))
    try:
        result = run_stage(cfg, out_dir)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def spawn_ppll(cfg: TrainCfg, world: int | None = None) -> dict[str, Any]:
    """Run PPLL with ``world`` local processes on loopback (tests, a single machine); returns rank 0's metrics."""
    world = world or cfg.ppll.procs
    out_dir = str(new_run_dir(cfg.run.out, run_name(cfg) + "_ppll"))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _spawned,
        args=(world, _free_port(), to_dict(cfg), out_dir, queue),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return queue.get()


def fit_ppll(cfg: TrainCfg) -> dict[str, Any] | None:
    """``locallearn train ... parallel=ppll``: under torchrun, join its process group; else spawn the ranks."""
    if "RANK" not in os.environ:
        if not cfg.ppll.procs:
            raise ConfigError("parallel=ppll needs torchrun (--nproc-per-node K) or ppll.procs=K to spawn locally")
        return spawn_ppll(cfg)
    backend = "nccl" if resolve_device(cfg.run.device).type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.ppll.timeout))
    try:
        return run_stage(cfg)
    finally:
        dist.destroy_process_group()
