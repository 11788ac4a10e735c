"""Many training runs as one study: skip what finished, continue what was interrupted, run several at once.

``locallearn bench accuracy`` and ``locallearn compare`` both train a list of (variant, seed) runs into one folder.
A study can outlast a sitting, so:

* a run whose record is already in the study's record is skipped;
* a run with a checkpoint but no record (the process was stopped) continues from ``ckpt_last.pt`` with the same
  data order, RNG and parameters (:func:`~locallearn.train.entry.fit`), so the final table equals an uninterrupted
  study's (timings aside); ``run.ckpt_every`` bounds the steps an interruption loses;
* with ``workers > 1`` the runs train in that many spawned processes at once (one torch thread each unless
  ``run.threads`` says otherwise), each writing its output to ``runs/<name>.log``; two one-thread processes
  outrun one two-thread process on small CPU models (``benchmarks/accuracy_fmnist_full``).

The caller gets each finished run's record as it completes, in any order, and saves it at once.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import dataset_spec
from ..train.build import build_engine, build_task
from ..train.config import TrainCfg, config_from_dict, to_dict
from ..train.entry import fit
from ..train.estimate import estimate_step, meta_batch
from ..train.rundir import MetricsLog, latest_run_dir, train_throughput, training_seconds
from .variants import Variant, variant_config


@dataclass(frozen=True)
class Run:
    """One training run of a study: a variant, a seed and its config (``run.name`` = :func:`run_name`)."""

    variant: Variant
    seed: int
    cfg: TrainCfg


def run_name(variant: Variant, seed: int) -> str:
    """The run directory's name after its date stamp, e.g. ``dgl+man_k8_seed0``."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "-", f"{variant.label}_k{variant.k}_seed{seed}")


def plan_runs(base: TrainCfg, variants: list[Variant], seeds: list[int], runs_dir: Path) -> list[Run]:
    """Every (variant, seed) whose config builds, variant by variant; a variant that cannot be built (a split
    preset without this K) is skipped with a note."""
    runs = []
    for v in variants:
        for seed in seeds:
            cfg = variant_config(base, v, [f"run.seed={seed}", f"run.out={runs_dir}", f"run.name={run_name(v, seed)}"])
            # A time-balanced split is measured when the run starts (fit); any balance checks that K fits.
            probe = cfg if cfg.split.balance != "time" else replace(cfg, split=replace(cfg.split, balance="units"))
            try:
                build_engine(probe, dataset_spec(cfg.data.name), torch.device("cpu"), _probe(cfg))
            except ValueError as e:
                print(f"  skip {v.label} K={v.k}: {e}", flush=True)
                break
            runs.append(Run(v, seed, cfg))
    return runs


def _probe(cfg: TrainCfg) -> torch.Tensor:
    """Two zero samples of the training input's shape and dtype (images, or token ids), to validate a variant's
    split before training it."""
    like = meta_batch(replace(cfg, data=replace(cfg.data, batch_size=2))).input
    return torch.zeros(like.shape, dtype=like.dtype)


def partial_run(runs_dir: Path, name: str) -> Path | None:
    """The newest run directory called ``<date>_<name>`` with a checkpoint: an interrupted run to continue."""
    return latest_run_dir(runs_dir, name)


def run_record(run: Run, run_dir: Path, out: Path) -> dict[str, Any]:
    """What a study keeps of a finished run, read back from its ``metrics.jsonl`` (so a run that continued
    across sittings gives the same record): the final test metrics and aux metrics by depth, epochs, training
    set size, the saved-activation peak, training images/s and training seconds (evaluation excluded)."""
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    metric = build_task(run.cfg, dataset_spec(run.cfg.data.name)).headline  # acc, psnr, map
    final = next((r for r in reversed(records) if f"test_{metric}" in r), None)
    if final is None:
        raise RuntimeError(f"{run_dir}: training ended without a test evaluation")
    v = run.variant
    return {
        "key": v.key,
        "label": v.label,
        "method": v.method,
        "addons": list(v.addons),
        "split": v.split,
        "k": v.k,
        "seed": run.seed,
        "metric": metric,
        **{key: value for key, value in final.items() if key.startswith("test_") and key != "test_loss"},
        f"aux_{metric}": final.get(f"aux_{metric}", []),
        "epochs": final["epoch"],
        "steps": final["step"],
        "train_size": final.get("train_size"),
        "peak_activation_bytes": max(r.get("peak_act_bytes") or 0 for r in records),
        "imgs_per_s": train_throughput(records),
        "train_s": training_seconds(records, run.cfg.data.batch_size),
        "run_dir": str(run_dir.relative_to(out)),
    }


def longest_first(runs: list[Run]) -> list[Run]:
    """``runs`` by predicted training FLOPs per step, most first (stable; a run the meta-device estimator cannot
    predict, e.g. detection, counts as 0): with several workers the longest run starts first, so the study ends
    when its longest run does instead of when that run, started last, does (the demo's MLAAN row costs 6x E2E)."""

    def cost(run: Run) -> int:
        try:
            return estimate_step(run.cfg).train_flops
        except (ValueError, RuntimeError, NotImplementedError):  # scheduling only: the order does not change results
            return 0

    costs: dict[Variant, int] = {}
    for run in runs:  # the seeds of a variant cost the same
        if run.variant not in costs:
            costs[run.variant] = cost(run)
    return sorted(runs, key=lambda run: -costs[run.variant])


def _fit_in_child(cfg: dict[str, Any], resume: str | None, log: str, threads: int) -> str:
    """A worker process: one thread budget, output to ``log``, then :func:`fit`; returns the run directory."""
    torch.set_num_threads(threads)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        result = fit(config_from_dict(cfg), resume=resume)
    return result["run_dir"]


def train_runs(runs: list[Run], out: Path, workers: int, on_done: Callable[[dict[str, Any]], None]) -> None:
    """Train ``runs`` into ``out/runs`` (continuing interrupted ones), calling ``on_done(record)`` as each ends."""
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if workers == 1:
        for run in runs:
            partial = partial_run(runs_dir, run_name(run.variant, run.seed))
            note = f" (continuing {partial})" if partial else ""
            print(f"\n=== {run.variant.label} K={run.variant.k} seed {run.seed}{note}", flush=True)
            result = fit(run.cfg, resume=partial)
            on_done(run_record(run, Path(result["run_dir"]), out))
        return
    threads = (runs[0].cfg.run.threads if runs else None) or max(1, (os.cpu_count() or 1) // workers)
    runs = longest_first(runs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {}
        for run in runs:
            name = run_name(run.variant, run.seed)
            partial = partial_run(runs_dir, name)
            log = runs_dir / f"{time.strftime('%Y-%m-%d_%H%M%S')}_{name}.log"  # dated as the run folders are
            args = (to_dict(run.cfg), str(partial) if partial else None, str(log), threads)
            futures[pool.submit(_fit_in_child, *args)] = run
            note = f" (continuing {partial.name})" if partial else ""
            print(f"  queued {run.variant.label} K={run.variant.k} seed {run.seed}{note}; output in {log}", flush=True)
        for future in as_completed(futures):
            run = futures[future]
            on_done(run_record(run, Path(future.result()), out))
            print(f"  finished {run.variant.label} K={run.variant.k} seed {run.seed}", flush=True)
