"""The one training loop: every runtime (one process, a PPLL stage rank, a data-parallel replica) runs it.

The :class:`Trainer` owns the run: epochs and steps, the lr schedule, ``run.max_steps``, periodic checkpoints and
the carry that lets an epoch continued after an interruption record all of its steps, the per-epoch record
(per-module loss, the task's headline statistic, time, throughput, memory), evaluation cadence, the progress
bar, the console and the logs (metrics.jsonl, TensorBoard). The :class:`~locallearn.train.runtime.Runtime` it
drives owns only where steps run (docs/architecture.md, "Trainer and runtimes"). The public entry, ``fit``
(build, then run the trainer in one process), is :mod:`.entry`; multi-process runs (``parallel: ppll | dp``) run
the same trainer on every rank (:func:`locallearn.parallel.fit_parallel`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..measure.memory import SavedTensorMeter, cuda_peak_bytes, reset_cuda_peak
from .config import TrainCfg, dump_config, to_dict
from .interrupt import Interrupted, StopSignals
from .rundir import (
    MetricsLog,
    environment,
    format_row,
    format_step,
)
from .runtime import Reduced, Runtime
from .schedule import lr_at

METER_STEPS = 2  # steps measured by the saved-tensor meter (the peak is the same every step at a fixed shape)
CADENCE_STEPS = 5  # steps timed to choose the step-record cadence (log.every: null) and, in several processes,
# the time-based checkpoint interval


class Trainer:
    """Runs ``cfg``'s schedule on ``runtime``; ``resume``: continue from the runtime's checkpoint."""

    def __init__(self, cfg: TrainCfg, runtime: Runtime, *, resume: bool = False, quiet: bool = False) -> None:
        self.cfg, self.runtime, self.quiet = cfg, runtime, quiet
        self.engine, self.run_dir = runtime.engine, Path(runtime.run_dir)
        self.epoch = self.in_epoch = self.step = 0
        self.peak_act = 0
        self.best: dict[str, Any] | None = None  # the best evaluation so far: metric, value, epoch, step
        carried = None
        if resume:
            state = runtime.load()
            self.epoch, self.in_epoch, self.step = state["epoch"], state["step_in_epoch"], state["step"]
            self.peak_act = state.get("peak_act_bytes", 0) or 0
            self.best = state.get("best")
            carried = state.get("unrecorded")  # (checkpoints from before the carry was kept have none)
        # Figures of the steps since the last record (StepResult.figures summed), and their seconds and count.
        self.figures = torch.zeros(self.engine.k + 2, device=self.engine.device)
        self.carried = {"seconds": 0.0, "steps": 0}
        if carried:
            self.figures.copy_(carried["stats"])
            self.carried = {key: value for key, value in carried.items() if key != "stats"}
        self.log: MetricsLog | None = None
        self.log_every = cfg.log.every  # None until the first steps' speed sets it
        self.mark = (self.step, time.perf_counter(), self.figures.clone())  # where the step record starts
        self.last_save = time.perf_counter()
        self.stop_at: tuple[int, str] | None = None  # (step, signal) at which a signal stops the run
        self.ckpt_steps = 0  # a multi-process run's time-based checkpoint interval, in steps (agree_cadences)
        if runtime.writes:
            if not resume:
                (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            env = {**environment(self.engine.device), **runtime.environment()}
            (self.run_dir / "env.json").write_text(json.dumps(env, indent=2))
            self.log = MetricsLog(self.run_dir / "metrics.jsonl", cfg.log.tensorboard)
            if resume and not quiet:
                self.say_resumed(state)

    def say_resumed(self, state: dict[str, Any]) -> None:
        """Where a resumed run continues, and what a longer or shorter ``run.epochs`` does to the schedule."""
        cfg, steps = self.cfg, len(self.runtime.train_loader)
        if self.finished():
            return  # (fit says so)
        print(f"continuing {self.run_dir} at epoch {self.epoch + 1}, step {self.step}", flush=True)
        saved = state["config"]["run"]["epochs"]
        if saved != cfg.run.epochs:
            before = lr_at(cfg.optim, self.epoch, self.in_epoch, steps, saved)
            after = lr_at(cfg.optim, self.epoch, self.in_epoch, steps, cfg.run.epochs)
            print(
                f"note: run.epochs {saved} → {cfg.run.epochs}: the lr schedule is recomputed for {cfg.run.epochs} "
                f"epochs from here (lr at step {self.step}: {before:.4g} → {after:.4g})",
                flush=True,
            )

    def finished(self) -> bool:
        cfg = self.cfg
        return self.epoch >= cfg.run.epochs or bool(cfg.run.max_steps and self.step >= cfg.run.max_steps)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def save(self, carry: dict[str, Any] | None = None, name: str = "last") -> None:
        """Every rank: the runtime's checkpoint(s) at the current step (``name``: ``last`` or ``best``). ``carry``:
        seconds and figures of the steps since the last record (mid-epoch), so the resumed epoch records all of its
        steps."""
        position = {
            "config": to_dict(self.cfg),
            "epoch": self.epoch,
            "step_in_epoch": self.in_epoch,
            "step": self.step,
            "peak_act_bytes": self.peak_act,
            "best": self.best,
        }
        self.runtime.save(position, carry, name)
        self.last_save = time.perf_counter()

    def improved(self, record: dict[str, Any]) -> bool:
        """Is this evaluation the best so far by the task's headline metric (accuracy, PSNR, mAP; the task says
        which way is better)? Every rank holds the same evaluation, so every rank answers alike."""
        task = self.engine.task
        metric = f"test_{task.headline}"
        if metric not in record:
            return False
        sign = 1 if task.higher_is_better else -1
        if self.best is not None and sign * record[metric] <= sign * self.best["value"]:
            return False
        self.best = {"metric": metric, "value": record[metric], "epoch": record["epoch"], "step": self.step}
        return True

    def save_mid_epoch(self, start: float, done: int) -> None:
        """A checkpoint inside an epoch, with the carry of its ``done`` unrecorded steps since ``start``."""
        self.runtime.sync(self.step, flush=False)  # activations in flight need not land: a resume recomputes them
        carry = {"seconds": time.perf_counter() - start, "steps": done, **self.runtime.carry()}
        self.save({**carry, "stats": self.figures.cpu()})

    def checkpoint_due(self) -> bool:
        """Every ``run.ckpt_every`` steps, and about every ``run.ckpt_minutes``: by the clock in one process; in a
        multi-process run every ``ckpt_steps`` steps (the minutes at the first steps' speed, agreed by every rank:
        their clocks would pick different steps, and the per-rank checkpoints must hold one)."""
        run = self.cfg.run
        if run.ckpt_every and self.step % run.ckpt_every == 0:
            return True
        if not self.runtime.solo:
            return bool(self.ckpt_steps) and self.step % self.ckpt_steps == 0
        return run.ckpt_minutes > 0 and time.perf_counter() - self.last_save >= 60 * run.ckpt_minutes

    # ---- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any] | None:
        """Train to ``run.epochs`` (or ``run.max_steps``); the last record and ``run_dir`` on the writing rank."""
        cfg, engine, runtime = self.cfg, self.engine, self.runtime
        steps_per_epoch = len(runtime.train_loader)
        meter = SavedTensorMeter()
        result: dict[str, Any] = {"run_dir": str(self.run_dir), "ends": list(engine.ends)}
        if runtime.writes and not self.quiet:
            if self.finished():
                print(
                    f"{self.run_dir} is finished (epoch {self.epoch} of {cfg.run.epochs}, step {self.step}); "
                    "raise run.epochs to train it further",
                    flush=True,
                )
            else:
                print(
                    f"{runtime.label}run {self.run_dir}: {cfg.model.name}, {cfg.method.name} K={engine.k} split "
                    f"{engine.ends}, {steps_per_epoch} steps/epoch on {engine.device}",
                    flush=True,
                )
        if runtime.writes and self.log is not None:
            result |= next(iter(self.log.read()[-1:]), {})  # a finished run returns its last record
            self.warn_large_aux()
        started, first_step, stop = time.perf_counter(), self.step, False
        with StopSignals() as signals:
            while self.epoch < cfg.run.epochs and not stop:
                reset_cuda_peak(engine.device)
                start = time.perf_counter() - self.carried["seconds"]
                done = self.carried["steps"]  # steps since the last record, those before an interruption included
                runtime.begin_epoch(self.carried)
                self.carried = {"seconds": 0.0, "steps": 0}
                self.mark = (self.step, time.perf_counter(), self.figures.clone())
                batches = bar = runtime.batches(self.epoch, self.in_epoch)
                if self.shows_progress():
                    batches = bar = tqdm(
                        batches,
                        total=steps_per_epoch,
                        initial=self.in_epoch,
                        desc=f"epoch {self.epoch + 1}/{cfg.run.epochs}",
                        mininterval=1.0,
                        leave=False,
                    )
                for item in batches:
                    engine.set_lr(lr_at(cfg.optim, self.epoch, self.in_epoch, steps_per_epoch, cfg.run.epochs))
                    measuring = runtime.measures and self.step < METER_STEPS
                    engine.meter = meter if measuring else None
                    with meter if measuring else contextlib.nullcontext():
                        self.figures += runtime.step(item, self.step).figures
                    self.in_epoch, self.step, done = self.in_epoch + 1, self.step + 1, done + 1
                    if measuring:
                        self.peak_act = max(self.peak_act, meter.peak)
                    self.stop_at = self.stop_at or runtime.stop_step(self.step, signals.received)
                    if self.stop_at is not None and self.step >= self.stop_at[0]:
                        self.save_mid_epoch(start, done)  # every rank reaches the agreed step, saves, and stops
                        raise Interrupted(self.stop_at[1], self.run_dir, self.epoch + 1, self.step)
                    if self.step - first_step == CADENCE_STEPS:
                        self.agree_cadences(time.perf_counter() - started)
                    if self.log_every and self.step % self.log_every == 0:
                        self.log_steps(bar)
                    if self.checkpoint_due():
                        self.save_mid_epoch(start, done)
                    if cfg.run.max_steps and self.step >= cfg.run.max_steps:
                        stop = True
                        break
                if self.shows_progress():
                    bar.close()
                engine.meter = None
                runtime.sync(self.step)
                if engine.device.type == "cuda":
                    torch.cuda.synchronize(engine.device)
                reduced = runtime.reduce(self.figures, time.perf_counter() - start)
                self.figures.zero_()
                record = self.record(reduced, done)
                if self.in_epoch == steps_per_epoch:
                    self.epoch, self.in_epoch = self.epoch + 1, 0
                epoch_done = self.in_epoch == 0
                if epoch_done and (self.epoch % cfg.run.eval_every == 0 or self.epoch == cfg.run.epochs) or stop:
                    record.update(runtime.evaluate())
                best = self.improved(record)
                if self.log is not None:
                    self.log.log(record)
                    if not self.quiet:
                        print(runtime.label + format_row(record, engine.task.headline), flush=True)
                self.save()
                if best:
                    self.save(name="best")
                result.update(record)
        if self.log is not None:
            self.log.close()
        runtime.close(self.step)
        if not runtime.writes:
            return None
        result["peak_act_bytes"] = self.peak_act
        return result

    def warn_large_aux(self) -> None:
        """One warning line when the aux nets outweigh the backbone (a method meant to save memory would then hold
        more parameters, gradients and optimizer state than the network it trains)."""
        engine = self.engine
        backbone = sum(p.numel() for p in engine.backbone.parameters())
        aux = sum(p.numel() for head in engine.method.aux if head is not None for p in head.parameters())
        if backbone and aux > backbone:
            print(
                f"locallearn: warning: the aux nets hold {aux / backbone:.1f}× the backbone's parameters ({aux:,} vs "
                f"{backbone:,}); a smaller aux net (method.aux, method.widen, fewer add-ons) or fewer modules keeps "
                "the memory local learning saves",
                file=sys.stderr,
                flush=True,
            )

    def shows_progress(self) -> bool:
        """A progress bar on a terminal, from the writing rank (none under nohup or a batch system: a bar, even
        a disabled one, holds a multiprocessing lock that a killed rank would leak)."""
        return self.cfg.run.progress and self.runtime.writes and not self.quiet and sys.stderr.isatty()

    # ---- records -------------------------------------------------------------------------------------------
    def agree_cadences(self, seconds: float) -> None:
        """After the first :data:`CADENCE_STEPS` steps (``seconds``): with ``log.every: null``, step records every
        step count that takes about ``log.seconds``; in a multi-process run, checkpoints every count that takes
        about ``run.ckpt_minutes``. Rank 0's counts on every rank (collective calls, the same on every rank)."""
        per_step = max(seconds / CADENCE_STEPS, 1e-9)
        if self.log_every is None:
            self.log_every = int(self.runtime.agree(max(1, round(self.cfg.log.seconds / per_step))))
        if not self.runtime.solo and self.cfg.run.ckpt_minutes > 0:
            self.ckpt_steps = int(self.runtime.agree(max(1, round(60 * self.cfg.run.ckpt_minutes / per_step))))

    def log_steps(self, bar: Any) -> None:
        """A step record of the steps since the last one (collective: every rank reduces its figures)."""
        step, since, figures = self.mark
        now = time.perf_counter()
        reduced = self.runtime.reduce(self.figures - figures, now - since)
        self.mark = (self.step, now, self.figures.clone())
        if self.log is None:
            return
        headline, loader = self.engine.task.headline, self.runtime.train_loader
        seen = samples_seen(loader, self.in_epoch - (self.step - step), self.in_epoch)
        record = {
            "kind": "step",
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.engine.lr,
            "train_loss": reduced.losses,
            f"train_{headline}": reduced.stat_sum / max(1, seen),
            "imgs_per_s": seen / max(reduced.seconds, 1e-9),
            "elapsed_s": reduced.seconds,
        }
        self.log.log(record)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"loss {reduced.losses[-1]:.3f}", refresh=False)
        elif not self.quiet:
            print(self.runtime.label + format_step(record, headline), flush=True)

    def record(self, reduced: Reduced, done: int) -> dict[str, Any]:
        """The epoch record of the ``done`` steps since the last one (the evaluation is added by the loop)."""
        loader, engine = self.runtime.train_loader, self.engine
        seen = samples_seen(loader, self.in_epoch - done, self.in_epoch)
        record: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": engine.lr,
            "train_loss": reduced.losses,
            f"train_{engine.task.headline}": reduced.stat_sum / max(1, seen),
            "epoch_time_s": reduced.seconds,
            "imgs_per_s": seen / max(reduced.seconds, 1e-9),
            "train_size": loader.n,
        }
        if self.runtime.measures:
            record |= {"peak_act_bytes": self.peak_act, "peak_mem_bytes": cuda_peak_bytes(engine.device)}
        return record | reduced.extra


def samples_seen(loader: Any, first: int, last: int) -> int:
    """Samples in batches ``first..last-1`` of an epoch (the last batch may be short)."""
    return max(0, min(last * loader.batch_size, loader.n) - first * loader.batch_size)
