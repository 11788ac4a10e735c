"""What PPLL is measured against: classic pipeline parallelism and DDP of end-to-end training, and a spawn entry
point that times any of the runtimes on fixed batches (docs/pipeline.md, "Pipeline baselines and `bench pipeline`").

Kinds (one row each in ``locallearn bench pipeline``):

* ``e2e``, ``sequential``: one process, :meth:`LocalEngine.train_step` of the end-to-end or the local engine;
* ``ppll``: one process per local module, :func:`~.ppll.bench_step` (the PPLL stage loop on fixed batches);
* ``gpipe``, ``1f1b``: ``torch.distributed.pipelining`` ``ScheduleGPipe`` / ``Schedule1F1B`` on the *same split*
  as the local engine (rank k holds module k), end-to-end backprop of the task loss on the last stage only,
  ``scale_grads=True`` so the gradient is that of the mean loss over the global batch (torch divides by M);
* ``ddp``: ``DistributedDataParallel`` of the whole network on the same number of processes, each rank taking an
  equal shard of the same global batch;
* ``independent``: K processes that each run sequential local learning on the whole batch and never communicate.
  No K-process scheme can beat their total throughput on the same machine, so this row measures the ceiling
  that contention (shared caches, memory bandwidth, the host's scheduling) leaves for any K-process speed-up;
* ``solo``: sequential local learning on rank 0 of the K-process group while the other ranks wait, idle, in a
  barrier: the one-process reference timed in the same window as PPLL, so that drift of the shared machine
  between a one-process run and a K-process run does not enter their ratio.
* ``stages``: rank k runs PPLL's stage k on inputs it computed itself before timing (modules < k, forward, at the
  initial weights), sending nothing: the split's own bound. PPLL / this row is what the messages cost; this row /
  ``independent`` is what the imbalance of the stages costs (a step ends when the slowest stage ends).

Equivalence (tested): GPipe/1F1B with M micro-batches and DDP with K ranks give the gradients of single-process
E2E training that accumulates the mean loss over M (or K) equal micro-batches in order. That, not the
full-batch step, is the oracle, because BatchNorm normalises each micro-batch (or shard) with its own statistics
(the reason torchgpipe defers BatchNorm); with M=1 they coincide.

Timing (docs/pipeline.md, "Measurement rules"): every rank passes a barrier, then records when each of its steps
ends. A step is complete when its latest rank is done; steady-state samples/s is taken over the steps after
``warmup``, and the fill (the first step: pipeline fill plus lazy shape inference) is reported apart. A rank's busy
fraction is its compute seconds in that window divided by the window: PPLL counts everything but the seconds blocked
in :class:`~.ppll.Link`; GPipe/1F1B count ``forward_one_chunk``, ``backward_one_chunk`` and the optimizer step (the
micro-batch loss and P2P waits are idle); DDP and single-process runs report none.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel

from ..data.datasets import dataset_spec
from ..tasks.task import Batch
from ..train.build import build_engine, resolve_device
from ..train.config import ConfigError, TrainCfg, config_from_dict, to_dict
from ..train.engine import LocalEngine
from .launch import pin_cores
from .link import free_port
from .ppll import Link, bench_step, check_supported, stage_step

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
KINDS = ("e2e", "sequential", "solo", "ppll", "stages", "gpipe", "1f1b", "ddp", "independent")


@dataclass
class RunOpts:
    """``warmup`` steps (the fill, excluded from throughput), then ``steps`` timed ones; ``micro``: micro-batches
    per step (GPipe/1F1B); ``threads``: torch threads per process; ``keep_state``: return each rank's module
    parameters and gradients (tests); ``timeout``: seconds a collective may block before its rank fails;
    ``window``: PPLL sends in flight; ``labels``: PPLL's ``ppll.labels`` (``send``: targets travel with the
    activations); ``pin``: on CPU, bind rank r to its own ``threads`` cores (:func:`~.launch.pin_cores`)."""

    warmup: int = 3
    steps: int = 30
    micro: int = 1
    threads: int = 1
    keep_state: bool = False
    timeout: float = 120.0
    window: int = 2
    labels: str = "loader"
    pin: bool = False


class BusyClock:
    """Cumulative seconds spent inside the wrapped calls and ``with clock:`` blocks (a rank's compute time)."""

    def __init__(self) -> None:
        self.total = 0.0

    def __call__(self) -> float:
        return self.total

    def __enter__(self) -> BusyClock:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._start

    def wrap(self, obj: Any, name: str) -> None:
        """Time every call of ``obj.name`` (an instance attribute shadows the method for this object only)."""
        fn = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        setattr(obj, name, timed)


def timed_steps(
    step: Callable[[int], None], total: int, device: torch.device, busy: Callable[[], float] | None = None
) -> dict[str, Any]:
    """Run ``step(0..total-1)`` after a barrier; per step, its end time (s since the barrier) and busy seconds."""
    dist.barrier()
    t0 = time.perf_counter()
    ends: list[float] = []
    busy_s: list[float] = []
    last = busy() if busy else 0.0
    for i in range(total):
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter() - t0)
        if busy:
            now = busy()
            busy_s.append(now - last)
            last = now
    return {"step_end_s": ends, "busy": busy_s if busy else None}


def steady_state(ranks: list[dict[str, Any]], warmup: int, batch_size: int) -> dict[str, Any]:
    """Throughput of one run from its ranks' step end times (module docstring: "Timing")."""
    total = len(ranks[0]["step_end_s"])
    if not 1 <= warmup < total:
        raise ValueError(f"need 1 <= warmup < steps + warmup, got warmup={warmup} of {total} steps")
    done = [max(r["step_end_s"][i] for r in ranks) for i in range(total)]
    window = done[-1] - done[warmup - 1]
    own = [1000 * (r["step_end_s"][-1] - r["step_end_s"][warmup - 1]) / (total - warmup) for r in ranks]
    return {
        "samples_per_s": (total - warmup) * batch_size / window,
        "step_ms": 1000 * window / (total - warmup),
        "rank_step_ms": own,  # each rank's own steps (a PPLL rank may run up to a window ahead of the last)
        "fill_s": done[0],
        "warmup_s": done[warmup - 1],
        "busy_fraction": [_busy(r, warmup) for r in ranks],
    }


def _busy(rank: dict[str, Any], warmup: int) -> float | None:
    """Compute seconds over the rank's own steps after warm-up, divided by the time those steps took on it (a
    PPLL rank runs up to a window ahead of the last one, so its steps are not the latest rank's)."""
    if rank["busy"] is None:
        return None
    ends = rank["step_end_s"]
    return sum(rank["busy"][warmup:]) / (ends[-1] - ends[warmup - 1])


def _independent(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
    """The engine's own training steps on every rank, with no communication."""
    return timed_steps(lambda i: engine.train_step(batches[i % len(batches)]), opts.warmup + opts.steps, device)


def _solo(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
    """Rank 0 trains alone; the others block in the closing barrier (gloo waits without spinning) and report the
    CPU seconds they used meanwhile, so a results file shows that they left rank 0 the machine."""
    if dist.get_rank() == 0:
        result = _independent(engine, batches, opts, device)
        dist.barrier()
        return result
    dist.barrier()  # the start barrier of timed_steps
    start = time.process_time()
    dist.barrier()
    return {"step_end_s": None, "busy": None, "idle_cpu_s": time.process_time() - start}


def _single(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
    if dist.get_world_size() != 1:
        raise ConfigError("single-process runs take one rank")
    return _independent(engine, batches, opts, device)


def _ppll(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    if engine.k != world:
        raise ConfigError(f"PPLL runs one process per module: K={engine.k} modules but {world} processes")
    check_supported(engine)
    channels_last = batches[0].input.is_contiguous(memory_format=torch.channels_last)
    link = Link(rank, world, opts.window, channels_last, device)
    total = opts.warmup + opts.steps
    result = timed_steps(
        bench_step(engine, batches, link, opts.labels == "send"), total, device, lambda: time.perf_counter() - link.idle
    )
    link.shutdown(total)
    return result


class _NoMessages:
    """The part of :class:`~.ppll.Link` that :func:`~.ppll.stage_step` uses, sending nothing."""

    def send(self, *_: Any) -> None:
        pass


def _stages(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
    """PPLL's stage loop on every rank, each on its own precomputed inputs, without messages (module doc)."""
    k = dist.get_rank()
    if engine.k != dist.get_world_size():
        raise ConfigError(
            f"the stages row runs one process per module: K={engine.k}, {dist.get_world_size()} processes"
        )
    inputs = []
    with torch.no_grad():
        for batch in batches:
            h = batch.input
            for module in engine.modules[:k]:
                h = module(h)
            inputs.append(h)
    link = _NoMessages()

    def step(i: int) -> None:
        stage_step(engine, k, inputs[i % len(inputs)], batches[i % len(batches)], link, i)  # type: ignore[arg-type]

    return timed_steps(step, opts.warmup + opts.steps, device)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (the input gradient a stage sends upstream)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _GlooSafe(torch.nn.Module):
    """Module k with contiguous tensors at its boundary, both ways: the stages allocate receive buffers with the
    sender's strides (activation and input gradient), and gloo refuses any other layout, such as channels_last.
    Inside, the input is channels_last again when the engine is."""

    def __init__(self, module: torch.nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.module, self.channels_last = module, channels_last

    def forward(self, *xs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One tensor, or the tensors of a captured model's carry (the pipelining stage passes a tuple output
        on as several arguments)."""
        xs = tuple(self._inward(x) for x in xs)
        out = self.module(xs if len(xs) > 1 else xs[0])
        return tuple(o.contiguous() for o in out) if isinstance(out, tuple) else out.contiguous()

    def _inward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x = _ContiguousGrad.apply(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _pipelined(kind: str) -> Callable[..., dict[str, Any]]:
    def run(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
        """Rank k runs module k as a pipeline stage; only the last stage has a loss (the task loss)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        if engine.k != world:
            raise ConfigError(f"{kind}: one process per module, K={engine.k} modules but {world} processes")
        if len(batches[0]) % opts.micro:
            raise ConfigError(f"{kind}: batch {len(batches[0])} does not split into {opts.micro} equal micro-batches")
        # The rank's optimizer also holds its aux net, whose parameters never get a gradient here: SGD skips them.
        module = engine.modules[rank]
        channels_last = batches[0].input.is_contiguous(memory_format=torch.channels_last)
        stage = PipelineStage(_GlooSafe(module, channels_last), rank, world, device)
        schedule = SCHEDULES[kind](
            stage, opts.micro, loss_fn=lambda out, y: engine.task.loss(out, Batch(out, y)), scale_grads=True
        )
        clock = BusyClock()
        clock.wrap(stage, "forward_one_chunk")
        clock.wrap(stage, "backward_one_chunk")
        engine.backbone.train()
        inputs = [b.input.contiguous() for b in batches] if stage.is_first else []  # converted once, untimed

        def step(i: int) -> None:
            engine.zero_grad(rank)
            args = (inputs[i % len(inputs)],) if stage.is_first else ()
            schedule.step(*args, target=batches[i % len(batches)].target if stage.is_last else None)
            with clock:
                engine.step_module(rank)

        return timed_steps(step, opts.warmup + opts.steps, device, clock)

    return run


def _ddp(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
    """Every rank holds the whole network (the E2E engine, one module) and an equal shard of the global batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if engine.k != 1:
        raise ConfigError(f"ddp trains end to end: the engine must have one module, got K={engine.k}")
    if len(batches[0]) % world:
        raise ConfigError(f"ddp: batch {len(batches[0])} does not split into {world} equal shards")
    model = DistributedDataParallel(engine.modules[0], device_ids=[device.index] if device.type == "cuda" else None)
    engine.backbone.train()

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        x, y = batch.input.chunk(world)[rank], batch.target.chunk(world)[rank]
        engine.zero_grad(0)
        engine.task.loss(model(x), Batch(x, y)).backward()
        engine.step_module(0)

    return timed_steps(step, opts.warmup + opts.steps, device)


@torch.no_grad()
def _transfer(engine: LocalEngine, batches: list[Batch], opts: RunOpts, device: torch.device) -> dict[str, Any]:
    """One-way time of each module boundary's activation (micro-batch of B/``micro``) between two ranks: the
    median of ``steps`` ping-pongs (after ``warmup``) halved, as rank 0 sees it (feeds :mod:`~..bench.simulate`)."""
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise ConfigError("the transfer probe runs on exactly 2 processes")
    x, shapes = batches[0].input[: len(batches[0]) // opts.micro], []
    for module in engine.modules[:-1]:
        x = module(x)
        shapes.append(tuple(x.shape))
    seconds = []
    for shape in shapes:
        buf, rounds = torch.zeros(shape, device=device), []
        for _ in range(opts.warmup + opts.steps):
            start = time.perf_counter()
            for op in (dist.send, dist.recv) if rank == 0 else (dist.recv, dist.send):
                op(buf, 1 - rank)
            rounds.append((time.perf_counter() - start) / 2)
        seconds.append(statistics.median(rounds[opts.warmup :]))
    return {"comm_s": seconds, "shapes": [list(s) for s in shapes], "step_end_s": [], "busy": None}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "e2e": _single,
    "sequential": _single,
    "solo": _solo,
    "ppll": _ppll,
    "stages": _stages,
    "gpipe": _pipelined("gpipe"),
    "1f1b": _pipelined("1f1b"),
    "ddp": _ddp,
    "independent": _independent,
    "transfer": _transfer,
}


Job = tuple[str, TrainCfg, RunOpts]  # kind, the engine's config, how to run it


def _rank_main(rank: int, world: int, port: int, jobs: list, tensors: list, out: str) -> None:
    cfg = config_from_dict(jobs[0][1])
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=max(opts.timeout for *_, opts in jobs))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    try:
        batches = [Batch(*(None if t is None else t.to(device) for t in b)) for b in tensors]
        for j, (kind, data, opts) in enumerate(jobs):
            torch.set_num_threads(opts.threads)
            cores = pin_cores(rank, world, opts.threads) if opts.pin and device.type == "cpu" else None
            cfg = config_from_dict(data)
            engine = build_engine(cfg, dataset_spec(cfg.data.name), device, batches[0].input)
            result = RUNNERS[kind](engine, batches, opts, device)
            result.update(rank=rank, threads=torch.get_num_threads(), module_ends=list(engine.ends), cores=cores)
            if opts.keep_state:
                part = engine.modules[rank] if kind in ("ppll", "gpipe", "1f1b") else engine.backbone
                result["state"] = {n: t.detach().cpu().clone() for n, t in part.state_dict().items()}
                result["grads"] = {n: p.grad.cpu().clone() for n, p in part.named_parameters() if p.grad is not None}
            torch.save(result, Path(out) / f"job{j}_rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_run(jobs: list[Job], world: int, batches: list[Batch], *, timeout: float = 600.0) -> list[list[dict]]:
    """Run ``jobs`` one after the other in ``world`` spawned ranks on loopback (gloo on CPU, NCCL on GPU);
    for each job, each rank's result (:func:`timed_steps`, plus ``state``/``grads`` with ``keep_state``).

    A job's config is its engine's: the local method's (same split) for ``sequential``, ``ppll``, ``gpipe``,
    ``1f1b`` and ``independent``, the E2E one for ``e2e`` and ``ddp``; each job builds a fresh engine (same initial
    weights). Every rank gets the same ``batches``. Raises if a rank fails (with its traceback) or if the jobs are
    not done after ``timeout`` seconds (the ranks are then killed): a hang fails, it never stalls.
    """
    for kind, *_ in jobs:
        if kind not in RUNNERS:
            raise ConfigError(f"unknown run kind {kind!r}; choose one of {', '.join(KINDS)}")
    tensors = [(b.input.cpu(), b.target.cpu(), None if b.raw is None else b.raw.cpu()) for b in batches]
    data = [(kind, to_dict(cfg), opts) for kind, cfg, opts in jobs]
    with tempfile.TemporaryDirectory(prefix="locallearn_") as tmp:
        context = mp.start_processes(
            _rank_main, args=(world, free_port(), data, tensors, tmp), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.perf_counter() + timeout
        try:
            while not context.join(timeout=1.0):
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{world} processes still running {[j[0] for j in jobs]} after {timeout:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [[torch.load(Path(tmp) / f"job{j}_rank{r}.pt") for r in range(world)] for j in range(len(jobs))]
