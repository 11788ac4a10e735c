"""``locallearn bench pipeline``: PPLL against sequential local learning, GPipe, 1F1B, DDP and single-process E2E,
side by side on the same model, split, data and global batch (docs/pipeline.md, "Measurement rules").

    locallearn bench pipeline -c configs/fmnist/demo.yaml --k 2 --threads 1 --simulate 4 method.name=dgl

Rows, each timed by :func:`~locallearn.parallel.pipeline_baselines.spawn_run` on the same fixed training batches
(full batches only, cycled) after ``--warmup`` steps:

* ``e2e`` and ``sequential`` (local learning) in one process, with ``--threads`` and with K × ``--threads``
  threads: the honest CPU comparison, "K processes × T threads" against "one process × K·T threads";
* ``ppll``, ``gpipe M=..``, ``1f1b M=..`` (M from ``--micro``, default {K, 2K, 4K}; 1F1B needs M ≥ K) and ``ddp``
  in K processes × ``--threads``; GPipe/1F1B use the local method's split, so every pipeline has the same stages;
* ``independent``: K processes × ``--threads``, each running sequential local learning on its own copy of the
  batch with no communication: their total samples/s is the most any K-process run can reach on this machine;
* ``solo``: sequential local learning again, in rank 0 of the K-process group while the other ranks idle in a
  barrier, timed right before ``ppll``, ``stages`` and ``independent``. The one-process rows run in another
  process, minutes apart, and a shared machine drifts by ±15 % between such windows; this row gives the goal's
  ratio, PPLL / sequential LL, from runs seconds apart;
* ``stages``: PPLL's stages at once, each on inputs it computed itself, with no messages. PPLL / ``stages`` is
  what the messages cost, ``stages`` / ``independent`` what the imbalance of the split costs; its busy column is
  each stage's step time over the slowest's.

The single-process rows share one spawned process and the K-process rows one group of K processes per round;
odd rounds run the groups, and the rows within them, in reverse order. Every figure is the median over rounds (a
ratio: the median of the per-round ratios, both runs of a round having seen about the same load), and each
headline ratio comes with a 95 % confidence interval of that median (:func:`median_interval`). ``--rows`` times a
subset, e.g. ``solo,ppll,stages,independent`` for many quick rounds of the goal's ratio. Each round records the CPU load
of other processes (``foreign_cores``), so contaminated multi-core runs can be spotted and discarded, and,
with ``ppll.pin_cores``, the cores of every rank (every row is pinned alike).

``--simulate K`` adds :mod:`.simulate`'s predictions for K devices and, for validation, for the measured K, printed
beside the measured throughput. ``results.json`` holds every round; ``results.md`` is rendered from it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.datasets import dataset_spec
from ..parallel.cross_stage import CrossStage
from ..parallel.pipeline_baselines import RunOpts, spawn_run, steady_state
from ..parallel.ppll import check_supported
from ..tasks.task import Batch
from ..train.build import build_engine, resolve_device, resolve_time_balance
from ..train.config import ConfigError, TrainCfg, load_config, to_dict
from ..train.rundir import make_dir
from .bench import bench_batches
from .pipeline_report import render_markdown
from .report import machine_info, write_atomic
from .simulate import default_micro, measure_stage_costs, ppll_fill, predict
from .variants import Variant, variant_config

DISTINCT_BATCHES = 8  # fixed batches cycled: data loading stays out of the timed loop
# --rows, in plan order
ROW_KINDS = ("e2e", "sequential", "solo", "ppll", "stages", "independent", "gpipe", "1f1b", "ddp")
SCHEDULES = (("gpipe", "GPipe"), ("1f1b", "1F1B"))


@dataclass(frozen=True)
class Row:
    """One timed configuration: ``kind`` on ``procs`` processes × ``threads`` threads, ``micro`` micro-batches."""

    kind: str
    procs: int
    threads: int
    micro: int = 1

    @property
    def name(self) -> str:
        """The simulator's key: ``ppll``, ``gpipe M=4``, ..."""
        return f"{self.kind} M={self.micro}" if self.kind in ("gpipe", "1f1b") else self.kind

    @property
    def label(self) -> str:
        if self.kind == "solo":  # one process computes; the other ranks of the group sit idle
            return f"sequential, in the {self.procs}-process window (1×{self.threads})"
        if self.kind == "stages":  # PPLL's stages, each on its own inputs, no messages
            return f"ppll stages alone, no messages ({self.procs}×{self.threads})"
        return f"{self.name} ({self.procs}×{self.threads})"


def plan_rows(k: int, threads: int, micro: list[int], kinds: tuple[str, ...] | list[str] = ROW_KINDS) -> list[Row]:
    """The rows of ``kinds`` (``--rows``), in the order they run: one-process rows, then ``solo``, ``ppll``,
    ``stages`` and ``independent`` back to back, then the baselines."""
    rows = [Row(kind, 1, t) for t in (threads, k * threads) for kind in ("e2e", "sequential")]
    rows += [Row(kind, k, threads) for kind in ("solo", "ppll", "stages", "independent")]
    rows += [Row("gpipe", k, threads, m) for m in micro]
    rows += [Row("1f1b", k, threads, m) for m in micro if m >= k]  # torch's Schedule1F1B rejects M < K
    return [row for row in [*rows, Row("ddp", k, threads)] if row.kind in kinds]


def _cpu_seconds() -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)."""
    try:
        ticks = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        busy = math.nan
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def _foreign_cores(before: tuple[float, float, float]) -> float | None:
    """Cores other processes kept busy since ``before`` (None where /proc/stat is unavailable)."""
    after = _cpu_seconds()
    value = ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])
    return None if math.isnan(value) else max(0.0, value)


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ips = [r["samples_per_s"] for r in rounds]
    busy = [[r["busy_fraction"][k] for r in rounds] for k in range(len(rounds[0]["busy_fraction"]))]
    return {
        "samples_per_s": statistics.median(ips),
        "samples_per_s_min": min(ips),
        "samples_per_s_max": max(ips),
        "step_ms": statistics.median(r["step_ms"] for r in rounds),
        "fill_s": statistics.median(r["fill_s"] for r in rounds),
        "busy_fraction": [None if None in b else statistics.median(b) for b in busy],
    }


def _per_round(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """a's samples/s divided by b's, round by round (both runs of a round saw about the same machine)."""
    return [x["samples_per_s"] / y["samples_per_s"] for x, y in zip(a["rounds"], b["rounds"])]


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median over rounds of a's samples/s divided by b's in the same round."""
    return statistics.median(_per_round(a, b))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: the order statistics [x_(j), x_(n+1-j)] (1-based) with
    the largest j whose coverage P(j ≤ Binomial(n, ½) ≤ n-j) is still ≥ ``level``; None when even [min, max] falls
    short (n < 6 at 95 %)."""
    xs, n = sorted(values), len(values)
    interval, tail = None, 0.0  # tail: P(Binomial(n, ½) ≤ j-1)
    for j in range(1, n // 2 + 1):
        tail += math.comb(n, j - 1) / 2**n
        if 1 - 2 * tail < level:
            break
        interval = (xs[j - 1], xs[n - j])
    return interval


def ratios(rows: list[dict[str, Any]], k: int, threads: int) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Every row against each reference present (the columns), the headline ratios whose two rows were
    both timed (``--rows`` may leave some out; older results lack ``solo`` and ``independent``), and each
    headline's 95 % confidence interval over rounds (:func:`median_interval`; None below 6 rounds)."""
    by = {r["label"]: r for r in rows}
    best: dict[str, dict[str, Any]] = {}  # the fastest M of each schedule (no 1F1B row when every M < K)
    for row in rows:
        kind = row["kind"]
        if kind in ("gpipe", "1f1b") and (kind not in best or row["samples_per_s"] > best[kind]["samples_per_s"]):
            best[kind] = row
    best_pp = max(best.values(), key=lambda r: r["samples_per_s"], default=None)
    one, many, multi = f"(1×{threads})", f"(1×{k * threads})", f"({k}×{threads})"
    seq, seq_many, ppll = by.get(f"sequential {one}"), by.get(f"sequential {many}"), by.get(f"ppll {multi}")
    e2e, e2e_many, ddp = by.get(f"e2e {one}"), by.get(f"e2e {many}"), by.get(f"ddp {multi}")
    ceiling = by.get(f"independent {multi}")
    alone = next((r for r in rows if r["kind"] == "stages"), None)
    solo = next((r for r in rows if r["kind"] == "solo"), None)
    named = [
        (f"e2e {one}", e2e),
        (f"sequential {one}", seq),
        (f"e2e {many}", e2e_many),
        (f"sequential {many}", seq_many),
    ]
    named += [(f"best GPipe/1F1B: {best_pp['label']}", best_pp)] if best_pp else []
    named += [(f"ddp {multi}", ddp)] + ([(solo["label"], solo)] if solo else [])
    refs = {name: ref for name, ref in named if ref is not None}
    for row in rows:
        row["ratios"] = {name: _ratio(row, ref) for name, ref in refs.items()}
    pairs = [
        ("ppll / sequential LL timed in the same window", ppll, solo),
        ("ppll / sequential LL, one thread per process", ppll, seq),
        (f"ppll / sequential LL in one process with {k * threads} threads", ppll, seq_many),
        (f"ppll / best of GPipe and 1F1B ({best_pp['label'] if best_pp else '-'})", ppll, best_pp),
        ("ppll / single-process E2E, same threads per process", ppll, e2e),
        (f"ppll / single-process E2E with {k * threads} threads", ppll, e2e_many),
        ("ppll / DDP E2E", ppll, ddp),
        ("best GPipe/1F1B / single-process E2E", best_pp, e2e),
        ("DDP / single-process E2E", ddp, e2e),
        (f"{k} independent sequential processes / sequential LL (this machine's {k}-process ceiling)", ceiling, seq),
        (f"{k} independent sequential processes / sequential LL timed in the same window", ceiling, solo),
        (f"ppll / {k} independent sequential processes", ppll, ceiling),
        ("ppll / its stages alone, no messages (what the messages cost)", ppll, alone),
        (f"its stages alone / {k} independent sequential processes (what the split's imbalance costs)", alone, ceiling),
        ("its stages alone / sequential LL timed in the same window (the split's bound)", alone, solo),
        *((f"ppll / best {name} ({row['label']})", ppll, row) for kind, name in SCHEDULES if (row := best.get(kind))),
    ]
    pairs = [(name, a, b) for name, a, b in pairs if a is not None and b is not None]
    headline = {name: _ratio(a, b) for name, a, b in pairs}
    return list(refs), headline, {name: median_interval(_per_round(a, b)) for name, a, b in pairs}


def split_for(cfg: TrainCfg, batches: list[Batch], threads: int) -> TrainCfg:
    """``split.balance: time`` resolved to explicit ends, measured on the first batch with ``threads`` threads (the
    threads of one process of the multi-process runs); other configs unchanged."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first = [(batches[0].input, batches[0].target, batches[0].raw)]
        return resolve_time_balance(cfg, dataset_spec(cfg.data.name), batches[0].input.device, first, quiet=False)
    finally:
        torch.set_num_threads(previous)


def simulate(
    ll_cfg: TrainCfg,
    ks: list[int],
    batches: list,
    threads: int,
    micro: dict[int, list[int]],
    timeout: float,
    split: dict[int, TrainCfg] | None = None,
) -> dict[str, Any]:
    """Stage costs (this process, ``threads`` threads) and transfer times (two processes) → predictions per K.
    ``split``: configs already split for some K (the measured runs' split), reused instead of measured again."""
    out: dict[str, Any] = {}
    previous, device, b = torch.get_num_threads(), resolve_device(ll_cfg.run.device), batches[0]
    for k in ks:
        cfg = (split or {}).get(k) or split_for(
            variant_config(ll_cfg, Variant(ll_cfg.method.name, None, k)), batches, threads
        )
        ms = sorted({1, *micro[k]})
        jobs = [("transfer", cfg, RunOpts(warmup=3, steps=15, micro=m, threads=threads)) for m in ms]
        probe = spawn_run(jobs, 2, batches[:1], timeout=timeout)
        comm = {m: ranks[0]["comm_s"] for m, ranks in zip(ms, probe)}
        torch.set_num_threads(threads)
        batch = Batch(*(None if t is None else t.to(device) for t in (b.input, b.target, b.raw)))
        before = _cpu_seconds()
        try:
            costs = measure_stage_costs(cfg, batch, micro[k], comm)
        finally:
            torch.set_num_threads(previous)
        foreign = _foreign_cores(before)
        out[str(k)] = {
            "micro": micro[k],
            "costs": costs.to_dict(),
            "predicted_samples_per_s": predict(costs, micro[k]),
            "ppll_fill_s": ppll_fill(costs),
            "foreign_cores": foreign,
            "shapes": {str(m): ranks[0]["shapes"] for m, ranks in zip(ms, probe)},
        }
        print(
            f"  simulated K={k}: "
            + ", ".join(f"{n} {v:.0f}" for n, v in out[str(k)]["predicted_samples_per_s"].items()),
            flush=True,
        )
    return out


def run_pipeline_bench(
    config: str | None,
    overrides: list[str] | tuple = (),
    *,
    k: int = 2,
    steps: int = 30,
    warmup: int = 3,
    repeats: int = 5,
    threads: int = 1,
    micro: list[int] | None = None,
    simulate_ks: list[int] | tuple = (),
    simulate_only: bool = False,
    out_dir: str | Path | None = None,
    timeout: float = 900.0,
    command: str | None = None,
    kinds: list[str] | tuple[str, ...] = ROW_KINDS,
) -> dict[str, Any]:
    """Run the comparison (and the simulation) into ``out_dir``; returns the ``results.json`` dict. ``kinds``: the
    rows to time (``--rows``), e.g. ``solo,ppll,stages,independent`` for many quick rounds of the goal's ratio."""
    if k < 2 or steps < 1 or warmup < 1 or repeats < 1 or threads < 1:
        raise ConfigError("bench pipeline needs --k >= 2 and --steps, --warmup, --repeats, --threads >= 1")
    unknown = [kind for kind in kinds if kind not in ROW_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"--rows {','.join(unknown)}: unknown row kind; choose from {','.join(ROW_KINDS)}")
    base = load_config(config, list(overrides))
    if base.method.name == "e2e":
        raise ConfigError("bench pipeline needs a local method to split the network, e.g. method.name=dgl")
    ll_cfg = variant_config(base, Variant(base.method.name, None, k))
    e2e_cfg = variant_config(base, Variant("e2e", None, 1))
    size = base.data.batch_size
    micro = sorted(set(micro or default_micro(k, size)))
    bad = [m for m in micro if m < 1 or size % m] + ([k] if size % k else [])
    if bad or not micro:
        raise ConfigError(
            f"batch {size} must split into K={k} DDP shards and into M equal micro-batches for some M in "
            f"{{K, 2K, 4K}} or --micro; {bad or [k, 2 * k, 4 * k]} do not divide it"
        )
    batches, note = bench_batches(ll_cfg, torch.device("cpu"), DISTINCT_BATCHES)
    batches = [b for b in batches if len(b) == size][:DISTINCT_BATCHES]
    if not batches:
        raise ConfigError(f"no full training batch of {size}; lower data.batch_size")
    auto_cfg, ll_cfg = ll_cfg, split_for(ll_cfg, batches, threads)  # the simulation re-splits per K
    engine = build_engine(ll_cfg, dataset_spec(ll_cfg.data.name), torch.device("cpu"), batches[0].input)
    check_supported(engine)  # refuse here, with one line, what PPLL cannot run
    cross_stage = CrossStage.needed(engine)  # EMA weights or cascade gradients cross stages: not simulated
    out = Path(out_dir) if out_dir else Path(base.run.out) / f"bench_pipeline_{Path(config or 'default').stem}"
    make_dir(out, "--out")
    results: dict[str, Any] = {
        "format": 1,
        "kind": "pipeline",
        "config": to_dict(base),
        "k": k,
        "module_ends": list(engine.ends),
        "batch_size": size,
        "threads_per_process": threads,
        "micro": micro,
        "row_kinds": list(kinds),
        "warmup": warmup,
        "steps": steps,
        "repeats": repeats,
        "data": note + f", {len(batches)} distinct full batches cycled",
        "machine": machine_info(resolve_device(base.run.device)),
        "command": command,
        "cross_stage_messages": cross_stage,
        "rows": [],
    }
    del engine
    print(f"bench pipeline: K={k}, split {results['module_ends']}, batch {size}, {threads} thread(s)/process -> {out}")
    if not simulate_only:
        results["rows"] = measure(ll_cfg, e2e_cfg, plan_rows(k, threads, micro, kinds), batches, results, timeout, out)
        results["ratio_columns"], results["headline"], results["headline_ci95"] = ratios(results["rows"], k, threads)
        _save(out, results)
    if simulate_ks or simulate_only:
        ks = sorted({k, *simulate_ks})
        print(f"simulation for K = {ks}:", flush=True)
        sim_micro = {kk: micro if kk == k else default_micro(kk, size) for kk in ks}
        results["simulation"] = simulate(auto_cfg, ks, batches, threads, sim_micro, timeout, {k: ll_cfg})
        for row in results["rows"]:
            name = "sequential" if row["kind"] == "solo" else row["name"]
            predicted = results["simulation"][str(k)]["predicted_samples_per_s"].get(name)
            row["predicted_samples_per_s"] = predicted if row["threads"] == threads else None
    results["machine"]["load_avg_end"] = machine_info(resolve_device(base.run.device))["load_avg"]
    _save(out, results)
    print(f"\nsaved {out / 'results.md'} and results.json\n")
    print((out / "results.md").read_text())
    return results


def measure(
    ll_cfg: TrainCfg,
    e2e_cfg: TrainCfg,
    rows: list[Row],
    batches: list,
    results: dict[str, Any],
    timeout: float,
    out: Path,
) -> list[dict[str, Any]]:
    """``repeats`` rounds: the one-process rows in one spawned process, the K-process rows in one group."""
    warmup, steps, size = results["warmup"], results["steps"], results["batch_size"]
    records = [{**asdict(row), "name": row.name, "label": row.label, "rounds": []} for row in rows]
    groups = [[i for i, r in enumerate(rows) if r.procs == 1], [i for i, r in enumerate(rows) if r.procs > 1]]
    groups = [group for group in groups if group]
    for round_ in range(results["repeats"]):  # odd rounds run everything in reverse order: drift cancels out
        for group in groups if round_ % 2 == 0 else [g[::-1] for g in groups[::-1]]:
            world = rows[group[0]].procs
            jobs = []
            for i in group:
                row = rows[i]
                cfg = e2e_cfg if row.kind in ("e2e", "ddp") else ll_cfg
                ppll = ll_cfg.ppll  # its labels, window and core pinning (every row pinned alike, or none)
                opts = RunOpts(
                    warmup, steps, row.micro, row.threads, window=ppll.window, labels=ppll.labels, pin=ppll.pin_cores
                )
                jobs.append((row.kind, cfg, opts))
            before = _cpu_seconds()
            per_job = spawn_run(jobs, world, batches, timeout=timeout)
            foreign = _foreign_cores(before)
            for i, ranks in zip(group, per_job):
                samples = size * (rows[i].procs if rows[i].kind == "independent" else 1)  # K batches per step
                measured = {"foreign_cores": foreign, "cores": [r["cores"] for r in ranks]}  # None: not pinned
                if rows[i].kind == "solo":  # rank 0 alone computed; the others' CPU seconds show they idled
                    measured["idle_ranks_cpu_s"] = [r["idle_cpu_s"] for r in ranks[1:]]
                    ranks = ranks[:1]
                measured.update(steady_state(ranks, warmup, samples))
                if rows[i].kind == "stages":  # each stage over the slowest: a message-free pipeline's busy fractions
                    measured["busy_fraction"] = [t / max(measured["rank_step_ms"]) for t in measured["rank_step_ms"]]
                records[i]["rounds"].append(measured)
                records[i]["module_ends"] = ranks[0]["module_ends"]
            line = ", ".join(f"{rows[i].label} {records[i]['rounds'][-1]['samples_per_s']:.0f}" for i in group)
            load = "?" if foreign is None else f"{foreign:.2f}"
            print(f"  round {round_ + 1}/{results['repeats']} (foreign load {load} cores): {line}", flush=True)
        for record in records:
            if record["rounds"]:
                record.update(_summary(record["rounds"]))
        results["rows"] = records
        _save(out, results)  # every finished round is on disk
    return records


def _save(out: Path, results: dict[str, Any]) -> None:
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / "results.md", render_markdown(results) + "\n")
