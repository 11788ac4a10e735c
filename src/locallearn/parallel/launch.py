"""Starting the ranks of a multi-process run, and what they must agree on before training
(docs/pipeline.md, "PPLL: one process per module" and "Checkpoints, resume and failure handling").

Two entry points run the same rank body (:func:`~.ppll.run_stage`, :func:`~.data_parallel.run_dp`):

* ``torchrun --nproc-per-node W -m locallearn train ...`` (multi-node through torchrun's rendezvous): every rank
  joins the process group named by the environment (:func:`run_torchrun`; NCCL on CUDA, gloo on CPU);
* ``ppll.procs=W`` without torchrun (tests, one machine): :func:`spawn` starts W processes on loopback with
  ``torch.multiprocessing`` and returns rank 0's result.

Every process group gets ``ppll.timeout`` seconds, so a collective or receive whose peer died or hangs fails that
rank with a non-zero exit instead of waiting for ever. A :class:`ConfigError` raised by a spawned rank reaches
the parent as the same one-line ConfigError.

Agreement (:func:`agreed_config`): ``split.balance: time`` is measured **once, on rank 0**, on one global batch,
and the resulting ends are broadcast, so every rank builds the same split (timings differ from process to
process, and a split measured per rank could differ); the run's saved config holds the explicit ends, so a
resumed run does not measure again. Rank 0 measures while the others wait in the broadcast, so the measurement
must fit in ``ppll.timeout`` (raise it for very deep networks), and it assumes the devices are alike.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from ..train.build import build_engine, build_loaders, resolve_device, resolve_time_balance
from ..train.config import ConfigError, TrainCfg, config_from_dict, to_dict
from ..train.rundir import new_run_dir
from ..train.trainer import Trainer
from .link import StageError, short_error

Body = Callable[[TrainCfg, "str | None", bool], "dict[str, Any] | None"]


_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []  # before any pinning


def pin_cores(slot: int, slots: int, threads: int) -> list[int] | None:
    """Bind this process to cores of its own: process ``slot`` of the ``slots`` on this machine gets ``threads``
    cores (``sched_setaffinity``), so ranks neither share a core nor migrate between cores. Only where the cores
    this process started with cover every slot (and the OS has affinities, i.e. Linux); otherwise nothing changes.
    Returns the cores, or None. DataLoader workers inherit the binding."""
    if not _CORES or threads < 1 or not 0 <= slot < slots or slots * threads > len(_CORES):
        return None
    mine = _CORES[slot * threads : (slot + 1) * threads]
    os.sched_setaffinity(0, mine)
    return mine


def rank_device(cfg: TrainCfg) -> torch.device:
    """This rank's device: ``run.device``, with CUDA pinned to ``LOCAL_RANK`` (one GPU per process); on CPU, with
    ``ppll.pin_cores``, this rank's own cores (:func:`pin_cores`)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    if device.type == "cpu" and cfg.ppll.pin_cores:
        slots = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
        pin_cores(int(os.environ.get("LOCAL_RANK", dist.get_rank())), slots, torch.get_num_threads())
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


def _timeout(cfg: TrainCfg) -> datetime.timedelta:
    return datetime.timedelta(seconds=cfg.ppll.timeout)


def new_group(cfg: TrainCfg, ranks: list[int] | None = None) -> Any:
    """A process group with the run's timeout; every rank must call it, in the same order."""
    return dist.new_group(ranks, timeout=_timeout(cfg))


def _broadcast(objects: list[Any], device: torch.device) -> None:
    dist.broadcast_object_list(objects, src=0, device=device if device.type == "cuda" else None)


def agreed(value: Any, device: torch.device) -> Any:
    """Rank 0's ``value`` on every rank (every rank calls it)."""
    box = [value]
    _broadcast(box, device)
    return box[0]


def agreed_config(cfg: TrainCfg, spec: Any, device: torch.device, loader: Any) -> TrainCfg:
    """``split.balance: time``: rank 0 measures and broadcasts the split (module doc); other configs unchanged."""
    if cfg.split.balance != "time" or cfg.split.preset != "auto":
        return cfg
    split = [resolve_time_balance(cfg, spec, device, loader, quiet=False).split if dist.get_rank() == 0 else None]
    _broadcast(split, device)
    return replace(cfg, split=split[0])


def agreed_run_dir(cfg: TrainCfg, out_dir: str | None, name: str, device: torch.device) -> Path:
    """The run directory: ``out_dir``, or a new one made by rank 0, told to every rank."""
    names = [out_dir or (str(new_run_dir(cfg.run.out, name)) if dist.get_rank() == 0 else None)]
    _broadcast(names, device)
    return Path(names[0])


class Heartbeat:
    """Names the ranks that died or hang when a rank fails (hangs on gloo are what pipeline users report most).
    A daemon thread bumps this rank's counter in the rendezvous store every ``interval`` seconds; after a failure,
    :meth:`silent` reads every counter twice, ``3·interval`` apart, and returns the ranks whose counter did not
    move (or never appeared). The counters are compared with themselves, never across clocks, so it works across
    machines; a gloo error alone only says "connection closed", not which rank is gone."""

    def __init__(self, interval: float = 1.0) -> None:
        self.rank, self.world, self.interval = dist.get_rank(), dist.get_world_size(), interval
        self.describe: Callable[[int], str] = lambda r: f"rank {r}"
        self.store = dist.distributed_c10d._get_default_store()
        self._stop = threading.Event()
        self.store.set(self._key(self.rank), "0")
        threading.Thread(target=self._beat, daemon=True, name="locallearn-heartbeat").start()

    @staticmethod
    def _key(rank: int, what: str = "heartbeat") -> str:
        return f"locallearn/{what}/{rank}"

    def _beat(self) -> None:
        count = 0
        while not self._stop.wait(self.interval):
            count += 1
            try:
                self.store.set(self._key(self.rank), str(count))
            except Exception:  # the store is gone (its host died): nothing left to tell
                return

    def _read(self) -> list[str | None]:
        keys = [self._key(r) for r in range(self.world)]
        return [self.store.get(k).decode() if self.store.check([k]) else None for k in keys]

    def silent(self) -> list[int] | None:
        """Ranks (other than this one) whose heartbeat stopped; None if the store itself is unreachable."""
        try:
            first = self._read()
            time.sleep(3 * self.interval)
            second = self._read()
        except Exception:
            return None
        failed = [self.store.check([self._key(r, "failed")]) for r in range(self.world)]
        return [
            r
            for r in range(self.world)
            if r != self.rank and not failed[r] and (second[r] is None or first[r] == second[r])
        ]

    def failed(self) -> None:
        """This rank failed by itself (it is not the one that died): keep it out of the others' diagnosis."""
        with contextlib.suppress(Exception):
            self.store.set(self._key(self.rank, "failed"), "1")

    def stop(self) -> None:
        self._stop.set()


_HEARTBEAT: list[Heartbeat] = []


def name_ranks(describe: Callable[[int], str]) -> None:
    """How failure messages name a rank (``stage 2``, ``stage 1 (replica 1)``); called by a rank body."""
    for beat in _HEARTBEAT:
        beat.describe = describe


STOP_KEY, STOP_STEP_KEY = "locallearn/stop", "locallearn/stop_step"


class StopAgreement:
    """A multi-process run stops on SIGINT/SIGTERM at one global step that every rank reaches, so the per-rank
    checkpoints form one state (docs/pipeline.md, "Checkpoints, resume and failure handling").

    A rank that gets the signal (or the parent of spawned ranks) sets a flag in the rendezvous store; every rank
    looks at the flag after each step (one store round trip). The first rank to see it fixes the stop step as its
    own step + ``margin`` with an atomic compare-and-set; ``margin`` exceeds how far ranks can drift apart (a
    pipeline stage runs at most its send window ahead of the next), so every rank sees the flag before that step
    and trains on to it without waiting for anyone: no rank blocks on a peer that has stopped."""

    def __init__(self, margin: int) -> None:
        self.store = dist.distributed_c10d._get_default_store()
        self.margin = margin

    def target(self, step: int, received: str | None) -> tuple[int, str] | None:
        """(stop step, what asked for it) once a stop was asked for anywhere, else None."""
        if received is not None:
            self.store.set(STOP_KEY, received)
        if not self.store.check([STOP_KEY]):
            return None
        agreed = self.store.compare_set(STOP_STEP_KEY, "", str(step + self.margin))
        return int(agreed), self.store.get(STOP_KEY).decode()


def train_rank(make_runtime: Callable[..., Any], cfg: TrainCfg, out_dir: str | None, resume: bool) -> Any:
    """The body of one rank of a multi-process run (process group initialised): build this rank's loaders and
    engine (a time-balanced split measured once, on rank 0), then run the trainer on
    ``make_runtime(cfg, engine, train_loader, test_loader, device, out_dir)``. Returns rank 0's metrics."""
    device = rank_device(cfg)
    train_loader, test_loader, spec = build_loaders(cfg, device)
    cfg = agreed_config(cfg, spec, device, train_loader)
    engine = build_engine(cfg, spec, device, next(iter(test_loader))[0][: cfg.data.batch_size])
    runtime = make_runtime(cfg, engine, train_loader, test_loader, device, out_dir)
    return Trainer(cfg, runtime, resume=resume).fit()


def run_body(body: Body, cfg: TrainCfg, out_dir: str | None, resume: bool) -> dict[str, Any] | None:
    """Run ``body`` in this rank with a heartbeat; any failure but a ConfigError becomes one :class:`StageError`
    line naming this rank, the error, and the ranks that died or hang."""
    beat = Heartbeat()
    _HEARTBEAT[:] = [beat]
    try:
        return body(cfg, out_dir, resume)
    except ConfigError:
        raise
    except Exception as e:
        beat.failed()
        silent = beat.silent()
        if silent is None:
            who = "the rendezvous store is unreachable (rank 0 or the launcher died)"
        elif silent:
            who = ", ".join(beat.describe(r) for r in silent) + " died or hangs (no heartbeat)"
        else:
            who = "every other rank is still alive"
        message = short_error(e)
        if not isinstance(e, StageError):
            message = f"{beat.describe(beat.rank)}: {message}"
        raise StageError(f"{message}; {who}") from e
    finally:
        beat.stop()
        _HEARTBEAT.clear()


def run_torchrun(body: Body, cfg: TrainCfg, resume: str | None) -> dict[str, Any] | None:
    """Join torchrun's process group (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``... in the environment; NCCL on
    CUDA, gloo on CPU) and run ``body`` in it."""
    backend = "nccl" if resolve_device(cfg.run.device).type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=_timeout(cfg))
    try:
        return run_body(body, cfg, resume, resume is not None)
    finally:
        dist.destroy_process_group()


def _spawned(
    rank: int, world: int, port: int, body: Body, data: dict, out_dir: str | None, resume: bool, queue: Any
) -> None:
    os.environ.update(LOCAL_RANK=str(rank))
    cfg = config_from_dict(data)
    backend = "nccl" if resolve_device(cfg.run.device).type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=_timeout(cfg))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=_timeout(cfg))
    try:
        result = run_body(body, cfg, out_dir, resume)
        if rank == 0 and queue is not None:
            queue.put(("result", result))
    except KeyboardInterrupt as e:  # a stop every rank agreed on, with its checkpoint written: not a failure
        if rank == 0 and queue is not None and str(e):
            queue.put(("interrupted", str(e)))
    except ConfigError as e:
        if queue is not None:
            queue.put(("error", str(e)))
        raise
    except StageError as e:  # torch.multiprocessing keeps the traceback for the parent: say it here, in one line
        print(f"locallearn: error: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()


def rank_failure(e: ProcessException, out_dir: str | None) -> str:
    """One line for a spawned rank that died: which rank, its signal, exit code or error, the last checkpoint
    and the command that continues from it."""
    how = getattr(e, "signal_name", None)
    if how:
        how = f"was killed by {how}"
    elif getattr(e, "exit_code", None) is not None:
        how = f"exited with code {e.exit_code}"
    else:  # ProcessRaisedException: the rank printed its own one-line error already; keep its last line
        how = "failed: " + (str(getattr(e, "msg", e)).strip().splitlines() or ["?"])[-1]
    return f"rank {e.error_index} (pid {e.error_pid}) {how}; the other ranks were stopped" + resume_hint(out_dir)


def resume_hint(out_dir: str | None) -> str:
    """``; last checkpoint X (saved HH:MM:SS); continue with: locallearn train --resume OUT``, or how to start
    again when nothing was saved yet."""
    if out_dir is None:
        return ""
    line = ""
    checkpoints = sorted(Path(out_dir).glob("ckpt_stage*.pt")) + sorted(Path(out_dir).glob("ckpt_last.pt"))
    if checkpoints:
        newest = max(checkpoints, key=lambda p: p.stat().st_mtime)
        saved = time.strftime("%H:%M:%S", time.localtime(newest.stat().st_mtime))
        line += f"; last checkpoint {newest} (saved {saved}); continue with: locallearn train --resume {out_dir}"
    else:
        line += f"; no checkpoint yet in {out_dir} (set run.ckpt_every=N to save every N steps); start it again"
    return line


def spawn(
    body: Body, cfg: TrainCfg, world: int, out_dir: str | None, resume: bool = False, timeout: float | None = None
) -> dict[str, Any]:
    """Run ``body`` on ``world`` local processes (loopback); rank 0's result. A rank that fails ends the others;
    so does an exception here (Ctrl-C, a test's timeout) or, with ``timeout``, running longer than that many
    seconds: no rank outlives the call. This process hosts the rendezvous store (as torchrun's agent does), so
    it outlives any rank and the survivors can still tell which rank died."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=_timeout(cfg), wait_for_workers=False)
    args = (world, store.port, body, to_dict(cfg), out_dir, resume, queue)
    context = mp.start_processes(_spawned, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = None if timeout is None else time.perf_counter() + timeout
    try:
        while True:
            try:
                if context.join(timeout=1.0):
                    break
            except KeyboardInterrupt:  # Ctrl-C: every rank stops at one step and checkpoints; a second one kills
                if store.check([STOP_KEY]):
                    raise
                store.set(STOP_KEY, "SIGINT")
                print("locallearn: stopping every rank at one step to save it (Ctrl-C again to kill)", file=sys.stderr)
                timeout = cfg.ppll.timeout
                deadline = time.perf_counter() + timeout
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"{world} spawned ranks still running after {timeout:.0f} s")
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; the ranks were stopped" + resume_hint(out_dir)) from None
    except ProcessException as e:
        while not queue.empty():
            kind, value = queue.get()
            if kind == "error":
                raise ConfigError(value) from None
        raise StageError(rank_failure(e, out_dir)) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    while not queue.empty():
        kind, value = queue.get()
        if kind == "result":
            return value
        if kind == "interrupted":
            raise KeyboardInterrupt(value)
    raise RuntimeError("the spawned ranks ended without a result from rank 0")
