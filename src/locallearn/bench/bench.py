"""``locallearn bench memory|speed|accuracy|all``: methods side by side on the same config, data and initial weights.

    locallearn bench memory -c configs/cifar10/resnet110_infopro_k4.yaml --methods e2e,infopro,infopro:infopro_star \
        --k 2,3,4,8,16 --out benchmarks/memory_resnet110_cpu
    locallearn bench accuracy -c configs/fmnist/demo.yaml --methods e2e,dgl,infopro,dgl+man --k 2,4 --seeds 2

Every (method, K) is built from one config with :func:`~locallearn.train.build.build_engine` and the config's
``run.seed``, so all variants start from the same backbone weights and see the same batches; ``e2e`` always runs
with K=1. A method token ``name:split`` picks a split preset for that method only (``infopro:infopro_star`` is
InfoPro*); (method, K) pairs a preset does not define are skipped with a note.

* ``memory``: one training step per variant under the saved-tensor meter (exact, device-independent), plus
  parameter/gradient/optimizer bytes, peak RSS, CUDA peaks above the data baseline, and forward+backward FLOPs of
  the backbone and of the aux nets (:mod:`torch.utils.flop_counter`).
* ``speed``: images/s, interleaved rounds of timed blocks (:mod:`locallearn.measure.speed`).
* ``pareto``: ``memory`` and ``speed``, then one table and figure of accuracy (``--accuracy``: a study's
  ``results.json``), total step peak, step time and training FLOPs (:mod:`.pareto`).
* ``accuracy``: :func:`~locallearn.train.entry.fit` per (method, K, seed), ``--jobs`` at a time (:mod:`.runs`).
  Each finished run is written to ``results.json`` at once and skipped when the command is run again with the
  same ``--out``; a run interrupted mid-way continues from its last checkpoint.

``results.json`` keeps the rows, the per-seed runs, the config, the machine and every command that added to it;
``results.md`` is regenerated from it after every change.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.datasets import dataset_spec
from ..data.idx import DataError
from ..measure.memory import (
    AllocatorPeak,
    CudaPeak,
    SavedTensorMeter,
    frozen_param_bytes,
    model_state_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)
from ..measure.speed import interleaved_throughput
from ..models.units import backward_carry, carry_tensors, detach_carry
from ..tasks.task import Batch
from ..train.build import build_engine, build_loaders, build_task, resolve_device, stream_seed
from ..train.config import ConfigError, TrainCfg, load_config, to_dict
from ..train.engine import LocalEngine
from ..train.plan import predicted_peaks
from ..train.rundir import make_dir
from .pareto import write_pareto
from .report import load_results, machine_info, save_results
from .runs import plan_runs, run_record, train_runs
from .variants import Variant, parse_variants, variant_config

KINDS = ("memory", "speed", "accuracy", "all", "pareto")


def bench_batches(cfg: TrainCfg, device: torch.device, n: int) -> tuple[list[Batch], str]:
    """The first ``n`` training batches of epoch 0 (cycled if the data is smaller), the same for every variant.

    With no ``data.root`` and no dataset files installed, falls back to random uint8 images of the dataset's shape
    and random labels (memory and speed do not depend on pixel values); the returned note says which was used.
    """
    spec = dataset_spec(cfg.data.name)
    try:
        loader = build_loaders(cfg, device)[0]
        batches = [Batch(x, y, raw) for x, y, raw in loader.batches(0)][:n]
        note = f"{cfg.data.name} training batches"
    except (DataError, FileNotFoundError):
        if cfg.data.root is not None or spec.task != "classification":  # synthetic labels are class indices
            raise
        g = torch.Generator().manual_seed(stream_seed(cfg.run.seed, "data"))
        shape = (cfg.data.batch_size, spec.channels, spec.size, spec.size)
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1) * 255
        std = torch.tensor(spec.std).view(1, -1, 1, 1) * 255
        batches = []
        for _ in range(n):
            raw = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
            y = torch.randint(0, spec.num_classes, (shape[0],), generator=g)
            x = (raw.float() - mean) / std
            if cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batches.append(Batch(x.to(device), y.to(device), raw.to(device)))
        note = f"synthetic random uint8 input of shape {list(shape)} ({cfg.data.name} files not found)"
    return [batches[i % len(batches)] for i in range(n)], note


def try_engine(cfg: TrainCfg, device: torch.device, sample: torch.Tensor) -> LocalEngine | str:
    """The variant's engine, or the one-line reason it does not exist (e.g. a preset without this K)."""
    try:
        return build_engine(cfg, dataset_spec(cfg.data.name), device, sample)
    except ValueError as e:
        return str(e)


def engine_flops(engine: LocalEngine, batch: Batch) -> dict[str, Any]:
    """Forward and backward FLOPs of one local training step, split into backbone and aux nets, per module.

    Runs on a deep copy, so BatchNorm statistics and gradients of the engine are untouched. The last module's
    task loss counts as backbone. The aux backward includes the gradient w.r.t. the module output it consumes.
    """
    modules, method = copy.deepcopy((engine.modules, engine.method))
    per_module: list[dict[str, int]] = []
    h = batch.input
    for k, module in enumerate(modules):
        row = {}
        with FlopCounterMode(display=False) as c:
            out = module(h)
        row["fwd"] = int(c.get_total_flops())
        z = detach_carry(out, requires_grad=True)
        with FlopCounterMode(display=False) as c:
            loss = method.local_loss(k, z, batch)
        row["aux_fwd"] = int(c.get_total_flops())
        with FlopCounterMode(display=False) as c:
            loss.backward()
        row["aux_bwd"] = int(c.get_total_flops())
        with FlopCounterMode(display=False) as c:
            backward_carry(out, [t.grad for t in carry_tensors(z)])
        row["bwd"] = int(c.get_total_flops())
        if k == len(modules) - 1:  # the task loss of the last module is part of ordinary training
            row = {"fwd": row["fwd"] + row["aux_fwd"], "bwd": row["bwd"] + row["aux_bwd"], "aux_fwd": 0, "aux_bwd": 0}
        per_module.append(row)
        h = detach_carry(out)
    total = {key: sum(r[key] for r in per_module) for key in ("fwd", "bwd", "aux_fwd", "aux_bwd")}
    backbone, aux = total["fwd"] + total["bwd"], total["aux_fwd"] + total["aux_bwd"]
    return {
        **total,
        "per_module": per_module,
        "aux_overhead": aux / max(backbone, 1),
        "train_step": train_step_flops(engine, batch),
    }


def train_step_flops(engine: LocalEngine, batch: Batch) -> int:
    """FLOPs of one whole training step as the engine runs it, on a deep copy: every forward, every backward,
    cascade hops that walk a module's graph again, checkpoint recomputation (what ``fwd + bwd`` of the parts
    above does not see). Element-wise work (EMA lerps, optimizer updates) is not counted, as in every FLOPs
    counter."""
    twin = copy.deepcopy(engine)
    with FlopCounterMode(display=False) as c:
        twin.train_step(batch)
    return int(c.get_total_flops())


def measure_memory(engine: LocalEngine, batches: list[Batch], device: torch.device) -> dict[str, Any]:
    """Saved-activation peak over ``batches`` (one step each), then parameter/gradient/optimizer bytes, peak RSS
    (reset first where the OS allows) and the CUDA peaks above the baseline at the start of the phase; then one
    more step under :class:`AllocatorPeak` (every allocation: activations, gradients, aux nets, temporaries),
    taken after the others so the optimizer state already exists, as in every later step of training."""
    gc.collect()
    rss_reset = reset_peak_rss()
    meter = SavedTensorMeter()
    engine.meter = meter
    with CudaPeak(device) as cuda, meter:
        for batch in batches:
            engine.train_step(batch)
    engine.meter = None
    with AllocatorPeak(device) as step:
        engine.train_step(batches[-1])
    params = [p for k in range(engine.k) for p in engine.module_parameters(k)]
    state = model_state_bytes(params, engine.optimizer_tensors())
    frozen = frozen_param_bytes(engine.method)
    return {
        "peak_act_bytes": meter.peak,
        **state,
        "frozen_param_bytes": frozen,  # EMA copies: held, never stepped
        "step_peak_bytes": step.peak,
        "total_step_peak_bytes": None if step.peak is None else step.peak + sum(state.values()) + frozen,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_is_per_variant": rss_reset,
        "cuda_peak_allocated_above_baseline": cuda.allocated,
        "cuda_peak_reserved_above_baseline": cuda.reserved,
        "steps": len(batches),
    }


def _row(results: dict[str, Any], variant: Variant, engine: LocalEngine | None = None) -> dict[str, Any]:
    for row in results["rows"]:
        if row["key"] == variant.key:
            break
    else:
        row = {"key": variant.key, "label": variant.label, "method": variant.method, "split": variant.split}
        results["rows"].append(row)
    row["addons"] = list(variant.addons)
    row["k"] = variant.k
    if engine is not None:
        row["ends"] = list(engine.ends)
    return row


def run_memory(base: TrainCfg, variants: list[Variant], results: dict[str, Any], out: Path, steps: int) -> None:
    device = resolve_device(base.run.device)
    batches, note = bench_batches(base, device, steps)
    results["memory_data"] = note
    for v in variants:
        start = time.perf_counter()
        engine = try_engine(variant_config(base, v), device, batches[0].input)
        if isinstance(engine, str):
            print(f"  skip {v.label} K={v.k}: {engine}", flush=True)
            continue
        row = _row(results, v, engine)
        row["memory"] = measure_memory(engine, batches, device)
        try:  # the planner's prediction of the same total, for the table's estimate column
            row["memory"]["estimated_total_step_peak_bytes"] = max(predicted_peaks(variant_config(base, v)))
        except ConfigError:  # a task the meta device cannot run (detection)
            row["memory"]["estimated_total_step_peak_bytes"] = None
        row["flops"] = engine_flops(engine, batches[0])
        del engine
        save_results(out, results)
        mem = row["memory"]
        print(
            f"  {v.label} K={v.k}: peak activations {mem['peak_act_bytes'] / 2**20:.1f} MiB, aux FLOPs "
            f"+{100 * row['flops']['aux_overhead']:.1f}% ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )


def run_speed(
    base: TrainCfg,
    variants: list[Variant],
    results: dict[str, Any],
    out: Path,
    *,
    steps: int,
    repeats: int,
    warmup: int,
) -> None:
    device = resolve_device(base.run.device)
    batches, note = bench_batches(base, device, max(steps, warmup))
    results["speed_data"] = note
    engines: dict[str, LocalEngine] = {}
    for v in variants:
        engine = try_engine(variant_config(base, v), device, batches[0].input)
        if isinstance(engine, str):
            print(f"  skip {v.label} K={v.k}: {engine}", flush=True)
            continue
        engines[v.key] = engine
        _row(results, v, engine)

    def stepper(engine: LocalEngine):
        return lambda i: engine.train_step(batches[i % len(batches)])

    names = {v.key: f"{v.label} K={v.k}" for v in variants}
    reference = next((names[v.key] for v in variants if v.method == "e2e" and v.key in engines), None)
    timed = interleaved_throughput(
        {names[key]: stepper(e) for key, e in engines.items()},
        images_per_step=len(batches[0]),
        device=device,
        block=steps,
        warmup=warmup,
        repeats=repeats,
        reference=reference,
        progress=lambda line: print("  " + line, flush=True),
    )
    for v in variants:
        if names[v.key] in timed:
            t = timed[names[v.key]]
            _row(results, v)["speed"] = {
                "images_per_s": t.median,
                "ratio_to_e2e": t.ratio,
                "step_ms": t.step_ms,
                "rounds_images_per_s": t.images_per_s,
                "rounds_ratio_to_e2e": t.ratios,
                "batch_size": t.batch_size,
                "block_steps": steps,
                "warmup_steps": warmup,
                "first_step_s": t.first_step_s,
            }
    save_results(out, results)


def run_accuracy(
    base: TrainCfg,
    variants: list[Variant],
    results: dict[str, Any],
    out: Path,
    seeds: int,
    workers: int = 1,
    train: bool = True,
) -> None:
    """Train every (variant, seed) not yet in ``results["runs"]`` (:mod:`.runs`), saving each record as it ends;
    records stay in variant-then-seed order whatever order the runs finish in. A finished run's record is read
    again from its run folder, so records follow the current definition of every field (``train=False``: only
    that, for ``--report-only``)."""
    done = {(r["key"], r["seed"]): r for r in results["runs"]}
    runs = plan_runs(base, variants, list(range(base.run.seed, base.run.seed + seeds)), out / "runs")
    for run in runs:
        old = done.get((run.variant.key, run.seed))
        if old is not None:
            print(f"  {run.variant.label} K={run.variant.k} seed {run.seed}: done, skipped", flush=True)
            if (out / old["run_dir"] / "metrics.jsonl").is_file():
                results["runs"][results["runs"].index(old)] = run_record(run, out / old["run_dir"], out)
    save_results(out, results)
    if not train:
        return
    todo = [run for run in runs if (run.variant.key, run.seed) not in done]
    for run in todo:
        _row(results, run.variant)  # the table's rows in the order asked, not the order runs finish
    order = {v.key: i for i, v in enumerate(variants)}

    def record(rec: dict[str, Any]) -> None:
        results["runs"].append(rec)
        results["runs"].sort(key=lambda r: (order.get(r["key"], len(order)), r["seed"]))
        save_results(out, results)

    train_runs(todo, out, workers, record)


def run_bench(
    kind: str,
    config: str | None,
    methods: list[str],
    ks: list[int],
    seeds: int = 1,
    out_dir: str | Path | None = None,
    overrides: list[str] | tuple = (),
    *,
    steps: int | None = None,
    repeats: int = 5,
    warmup: int = 2,
    workers: int = 1,
    accuracy: str | None = None,
    report_only: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run one benchmark kind (or ``all``) into ``out_dir`` and return the results dict (see module docstring).

    ``steps``: measured steps per variant for ``memory`` (default 1) and timed steps per round for ``speed``
    (default 5). An existing ``results.json`` in ``out_dir`` must come from the same config; its rows are updated
    and its finished accuracy runs kept. ``report_only``: measure and train nothing; pareto rewrites the table and
    figure from the existing ``results.json`` with ``accuracy`` (the study has more rows since), accuracy reads
    the finished runs' records again from their run folders and rewrites the table.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown bench kind {kind!r}; choose one of {', '.join(KINDS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if workers < 1:
        raise ConfigError(f"--jobs must be >= 1, got {workers}")
    base = load_config(config, list(overrides))
    if report_only and (
        kind not in ("pareto", "accuracy") or out_dir is None or not (Path(out_dir) / "results.json").is_file()
    ):
        raise ConfigError(
            "--report-only rewrites a pareto or accuracy table: give bench pareto or accuracy and the --out of an "
            "earlier run"
        )
    if base.run.threads:
        torch.set_num_threads(base.run.threads)
    variants = parse_variants(methods, ks)
    out = Path(out_dir) if out_dir is not None else Path(base.run.out) / f"bench_{Path(config or 'default').stem}"
    make_dir(out, "--out")
    results = load_results(out, to_dict(base))
    if accuracy is not None and not Path(accuracy).is_file():
        raise ConfigError(
            f"--accuracy {accuracy}: no such results.json (an accuracy study's, e.g. bench accuracy --out)"
        )
    if report_only and kind == "pareto":  # the measured record stays as it is; only the table and figure are rewritten
        for path in write_pareto(out, results, accuracy):
            print(f"wrote {path}")
        return results
    if report_only:  # accuracy: finished runs' records read again from their folders, nothing trained
        run_accuracy(base, variants, results, out, seeds, train=False)
        print(f"wrote {out / 'results.md'} and results.json")
        return results
    results["machine"] = machine_info(resolve_device(base.run.device))
    results["metric"] = build_task(base, dataset_spec(base.data.name)).headline  # the table's test column
    results["commands"].append({"command": command, "kind": kind, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    save_results(out, results)
    print(f"bench {kind}: {len(variants)} variants -> {out}", flush=True)
    if kind in ("memory", "all", "pareto"):
        print("memory (saved-tensor meter, one training step each):", flush=True)
        run_memory(base, variants, results, out, steps or 1)
    if kind in ("speed", "all", "pareto"):
        print("speed (interleaved rounds):", flush=True)
        run_speed(base, variants, results, out, steps=steps or 5, repeats=repeats, warmup=warmup)
    if kind in ("accuracy", "all"):
        print(f"accuracy ({seeds} seed(s) each; rerun with --out {out} to continue):", flush=True)
        run_accuracy(base, variants, results, out, seeds, workers)
    results["machine"]["load_avg_end"] = machine_info(resolve_device(base.run.device))["load_avg"]
    save_results(out, results)
    if kind == "pareto":
        for path in write_pareto(out, results, accuracy):
            print(f"wrote {path}")
    print(f"\nsaved {out / 'results.md'} and results.json\n")
    print((out / "results.md").read_text())
    return results
