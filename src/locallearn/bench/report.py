"""``results.json`` ⇄ ``results.md``: the bench's record and its Markdown table.

``results.json`` is the record: rows per (method, K) with whatever was measured (``memory``, ``flops``, ``speed``),
per-seed accuracy ``runs``, the config, the machine and every command that wrote to it, so a table or figure can
always be traced to what produced it. ``results.md`` is derived from it and rewritten after every change
(written atomically, so an interrupted bench never leaves a half file).
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..train.config import ConfigError, changed_keys, config_from_dict, to_dict
from ..train.rundir import environment

MiB = 2**20
FORMAT = 1


# Table header per task headline: accuracy in percent, PSNR in dB, COCO mAP@[.5:.95] as a fraction.
METRIC_LABELS = {"acc": "acc", "psnr": "PSNR dB", "map": "mAP"}
# How a headline is shown: factor from the logged value, decimals, unit after the number.
_SHOWN = {"acc": (100, 2, "%"), "psnr": (1, 2, ""), "map": (1, 3, "")}
_AS_LOGGED = (1, 2, "")  # a headline not listed above


def shown_value(metric: str, value: float) -> float:
    """A logged headline value in the unit tables and figures show (accuracy: fraction → percent)."""
    return _SHOWN.get(metric, _AS_LOGGED)[0] * value


def format_metric(metric: str, value: float, std: float | None = None) -> str:
    """``value`` (± ``std``) as the bench and compare tables print it: ``91.23%``, ``91.23 ± 0.40 %``,
    ``32.10 ± 0.05`` (PSNR, the header says dB), ``0.412`` (mAP needs the third decimal to tell methods apart)."""
    factor, decimals, unit = _SHOWN.get(metric, _AS_LOGGED)
    text = f"{factor * value:.{decimals}f}"
    if std is not None:
        text += f" ± {factor * std:.{decimals}f}" + (" " if unit else "")
    return text + unit


def load_text(load: list[float] | float | None) -> str:
    """Load averages as ``0.52 / 0.61 / 0.70`` (1, 5, 15 minutes), or ``?``."""
    if load is None:
        return "?"
    return " / ".join(f"{v:.2f}" for v in (load if isinstance(load, list) else [load]))


def machine_info(device: torch.device) -> dict[str, Any]:
    """:func:`~locallearn.train.rundir.environment` plus all three load averages and the exact command line."""
    env = environment(device)
    env["load_avg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["command"] = command_line()
    env["cwd"] = os.getcwd()
    env["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return env


def command_line() -> str:
    """``locallearn bench ...`` as typed (argv[0] shortened to the program name)."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog in ("__main__.py", "-m"):
        prog = "python -m locallearn"
    return shlex.join([prog, *sys.argv[1:]])


class Results(dict):
    """A bench record (a plain dict, written as JSON) that remembers ``synced``: the record as this process last
    read or wrote it, so a save can tell what this process changed from what another bench command wrote since."""

    synced: dict[str, Any] | None = None


def without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` less ``run.seed``: only the first seed of one command (every run records its own), so commands
    that start at other seeds share a study folder (one lane trains seed 1 while another trains seed 0)."""
    run = {key: value for key, value in (config.get("run") or {}).items() if key != "seed"}
    return {**config, "run": run}


def load_results(out: Path, config: dict[str, Any]) -> Results:
    """The existing record in ``out`` (which must be for ``config``, whatever its first seed), or a new one."""
    path = out / "results.json"
    if not path.exists():
        return Results(format=FORMAT, config=config, rows=[], runs=[], commands=[])
    results = Results(json.loads(path.read_text()))
    results.synced = copy.deepcopy(dict(results))
    try:  # written by an earlier version: its keys renamed and new keys at their defaults (same behaviour)
        saved = to_dict(config_from_dict(results.get("config") or {}))
    except ConfigError:
        saved = results.get("config") or {}
    if without_seed(saved) != without_seed(config):
        diff = sorted(changed_keys(saved, config))
        raise ConfigError(
            f"{out} holds results of a different config ({', '.join(diff[:4])} differ); use another --out "
            "or the same config and overrides"
        )
    results["config"] = config
    return results


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_results(out: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.md``, merged with what another bench command wrote to the same folder
    since this one read it (a speed or memory bench into a study that is still training; two studies training
    different runs), under a lock: :func:`merge_results`."""
    path = out / "results.json"
    synced = getattr(results, "synced", None)
    with open(out / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            merge_results(results, json.loads(path.read_text()), synced)
        write_atomic(path, json.dumps(results, indent=2) + "\n")
        write_atomic(out / "results.md", render_markdown(results) + "\n")
    if isinstance(results, Results):
        results.synced = copy.deepcopy(dict(results))


def _theirs(ours: dict[str, Any], disk: dict[str, Any], base: dict[str, Any] | None, field: str) -> bool:
    """Whether ``disk``'s value of ``field`` replaces ours: we have none, or we did not change ours since
    ``base`` (what we last read or wrote) and the disk's differs."""
    if field not in ours:
        return True
    return base is not None and field in base and ours[field] == base[field] and disk[field] != ours[field]


def merge_results(ours: dict[str, Any], disk: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """Merge into ``ours`` what another command wrote to ``disk``: rows, runs by (row, seed), commands and fields
    only ``disk`` has, and, given ``base`` (``ours`` as last read or written), every row field, run and top-level
    field we left unchanged since while ``disk``'s changed (a study re-reading its finished records, a memory
    bench re-measuring a row). What we changed wins; without ``base``, everything we hold wins."""
    base = base or {}
    base_rows = {row["key"]: row for row in base.get("rows", [])}
    rows = {row["key"]: row for row in ours["rows"]}
    for row in disk.get("rows", []):
        if row["key"] not in rows:
            ours["rows"].append(row)
            continue
        mine, was = rows[row["key"]], base_rows.get(row["key"])
        for field, value in row.items():
            if _theirs(mine, row, was, field):
                mine[field] = value
    base_runs = {(run["key"], run["seed"]): run for run in base.get("runs", [])}
    index = {(run["key"], run["seed"]): i for i, run in enumerate(ours["runs"])}
    for run in disk.get("runs", []):
        at = (run["key"], run["seed"])
        if at not in index:
            ours["runs"].append(run)
        elif ours["runs"][index[at]] == base_runs.get(at) and run != base_runs[at]:
            ours["runs"][index[at]] = run
    order = {row["key"]: i for i, row in enumerate(ours["rows"])}
    ours["runs"].sort(key=lambda run: (order.get(run["key"], len(order)), run["seed"]))
    ours["commands"] += [c for c in disk.get("commands", []) if c not in ours["commands"]]
    ours["commands"].sort(key=lambda c: c.get("date") or "")
    for field, value in disk.items():
        if field not in ("rows", "runs", "commands") and _theirs(ours, disk, base or None, field):
            ours[field] = value


def task_metric(results: dict[str, Any]) -> str:
    """The task's headline metric: ``acc`` (classification; also records written before ``metric`` existed),
    ``psnr`` (super-resolution) or ``map`` (detection)."""
    return results.get("metric") or next((r.get("metric", "acc") for r in results["runs"]), "acc")


def final_metric(run: dict[str, Any]) -> float:
    """A run record's final test metric (accuracy, PSNR, mAP)."""
    return run[f"test_{run.get('metric', 'acc')}"]


def accuracy_summary(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    """Mean, sample std and count of the final test metric (accuracy, PSNR) over the seeds of row ``key``."""
    accs = [final_metric(r) for r in results["runs"] if r["key"] == key]
    if not accs:
        return None
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"mean": statistics.fmean(accs), "std": std, "n": len(accs), "values": accs}


def run_peak_bytes(run: dict[str, Any]) -> int | None:
    """A run record's saved-activation peak (``peak_act_bytes`` in records written before the rename)."""
    return run.get("peak_activation_bytes") or run.get("peak_act_bytes")


def peak_act_mib(results: dict[str, Any], row: dict[str, Any]) -> float | None:
    """The memory bench's peak, else the one ``fit`` measured with the same meter during accuracy runs."""
    if "memory" in row:
        return row["memory"]["peak_act_bytes"] / MiB
    peaks = [run_peak_bytes(r) for r in results["runs"] if r["key"] == row["key"] and run_peak_bytes(r)]
    return max(peaks) / MiB if peaks else None


def _e2e(results: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in results["rows"] if r["method"] == "e2e"), None)


def _base_of(results: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """An add-on row's base: the row of the same method, split and K without add-ons."""
    if not row.get("addons"):
        return None
    key = f"{row['method'] if row.get('split') is None else row['method'] + ':' + row['split']}|k{row['k']}"
    return next((r for r in results["rows"] if r["key"] == key), None)


def gap_closed(results: dict[str, Any], row: dict[str, Any]) -> float | None:
    """(add-on − base) / (E2E − base) of the mean test metric over the seeds all three have: the share of the
    base→E2E gap an add-on closes (1 = reaches E2E, 0 = no better than its base, < 0 = worse). Matching seeds
    compare runs of the same data order and initialisation (an add-on with seed 0 only against its base's seed 0,
    not against a two-seed mean)."""
    base, e2e = _base_of(results, row), _e2e(results)
    if base is None or e2e is None:
        return None
    runs = results["runs"]
    by_seed = [{r.get("seed"): final_metric(r) for r in runs if r["key"] == x["key"]} for x in (row, base, e2e)]
    seeds = set(by_seed[0]) & set(by_seed[1]) & set(by_seed[2])
    if not seeds:
        return None
    add_on, base_acc, e2e_acc = (statistics.fmean(accs[s] for s in seeds) for accs in by_seed)
    return None if e2e_acc == base_acc else (add_on - base_acc) / (e2e_acc - base_acc)


def train_seconds(results: dict[str, Any], key: str) -> float | None:
    """Mean training seconds per run of row ``key`` over its seeds (evaluation excluded; None before any finished;
    records from before ``train_s`` existed are left out)."""
    seconds = [r["train_s"] for r in results["runs"] if r["key"] == key and r.get("train_s") is not None]
    return statistics.fmean(seconds) if seconds else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _mib_or_none(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dict per (method, K): the numbers of the Markdown table and the plots (None = not measured)."""
    e2e = _e2e(results)
    e2e_mem = peak_act_mib(results, e2e) if e2e else None
    flat = []
    for row in results["rows"]:
        mem = peak_act_mib(results, row)
        speed = row.get("speed") or {}
        flat.append(
            {
                "label": row["label"],
                "method": row["method"],
                "addons": row.get("addons", []),
                "k": row["k"],
                "peak_act_mib": mem,
                "mem_ratio": mem / e2e_mem if mem is not None and e2e_mem else None,
                "total_peak_mib": _mib_or_none((row.get("memory") or {}).get("total_step_peak_bytes")),
                "images_per_s": speed.get("images_per_s"),
                "speed_ratio": speed.get("ratio_to_e2e"),
                "aux_flops_pct": 100 * row["flops"]["aux_overhead"] if "flops" in row else None,
                "accuracy": accuracy_summary(results, row["key"]),
                "gap_closed": gap_closed(results, row),
                "train_s": train_seconds(results, row["key"]),
            }
        )
    return flat


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _allocator_note(setting: dict[str, Any] | None) -> str:
    if not setting:
        return ""  # recorded before the setting existed
    if setting.get("applied"):
        return (
            f"; CPU allocator tuned (mmap threshold {setting['mmap_threshold'] >> 20} MiB, trim threshold "
            f"{setting['trim_threshold'] >> 20} MiB)"
        )
    return f"; CPU allocator: glibc defaults ({setting.get('reason')})"


def setting_line(results: dict[str, Any]) -> str:
    """The first line of a bench table: model, data, batch and the machine the numbers were measured on."""
    cfg, machine = results["config"], results.get("machine", {})
    return (
        f"{cfg['model']['name']} (width {cfg['model']['width']}), {cfg['data']['name']}, batch "
        f"{cfg['data']['batch_size']}, device {machine.get('device', '?')} ({machine.get('device_name', '?')}), "
        f"{machine.get('threads', '?')} threads, torch {machine.get('torch', '?')}, git {machine.get('git', '?')}"
    )


def format_accuracy(metric: str, acc: dict[str, Any] | None, each_seed: bool = False) -> str:
    """An :func:`accuracy_summary` as a table cell: ``-`` without runs, ``91.23% (n=1)`` for one seed (no spread to
    show), ``91.23 ± 0.40 % (n=2)`` for more, with every seed's value after the count when ``each_seed``."""
    if acc is None:
        return "-"
    if acc["n"] == 1:
        return f"{format_metric(metric, acc['mean'])} (n=1)"
    values = ": " + ", ".join(format_metric(metric, v) for v in acc["values"]) if each_seed else ""
    return f"{format_metric(metric, acc['mean'], acc['std'])} (n={acc['n']}{values})"


def render_markdown(results: dict[str, Any]) -> str:
    machine, metric = results.get("machine", {}), task_metric(results)
    lines = [
        setting_line(results),
        "",
        "| method | K | peak activation MiB | vs E2E | images/s | vs E2E | aux FLOPs overhead "
        f"| test {METRIC_LABELS.get(metric, metric)} (mean ± std, n: each seed) | base→E2E gap closed "
        "| training time per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = table_rows(results)
    for r in rows:
        acc_text = format_accuracy(metric, r["accuracy"], each_seed=True)
        gap = "-" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f} %"
        lines.append(
            f"| {r['label']} | {r['k']} | {_fmt(r['peak_act_mib'], '.1f')} | {_fmt(r['mem_ratio'], '.3f')} | "
            f"{_fmt(r['images_per_s'], '.1f')} | {_fmt(r['speed_ratio'], '.3f')} | "
            f"{_fmt(r['aux_flops_pct'], '.1f')}{'' if r['aux_flops_pct'] is None else ' %'} | {acc_text} | {gap} | "
            f"{_duration(r['train_s'])} |"
        )
    if any(r["train_s"] is not None for r in rows):
        lines += [
            "",
            "Training time per run: the mean over seeds of the seconds each run spent in training steps (evaluation "
            "excluded), on the machine and under the load the runs trained with (below); images/s is measured side "
            "by side by the speed bench, not by these runs.",
        ]
    detail = [r for r in results["rows"] if "memory" in r]
    if detail:
        lines += [
            "",
            'Memory detail (MiB; every column: docs/benchmarks.md, "Memory detail"):',
            "",
            "| method | K | module ends | activations | params | grads | optimizer state | step peak (allocator) | "
            "total step peak | estimate (meta) | peak RSS | CUDA alloc | CUDA reserved |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in detail:
            m = r["memory"]

            def mib(b: int | None) -> str:
                return "-" if b is None else f"{b / MiB:.1f}"

            lines.append(
                f"| {r['label']} | {r['k']} | {r.get('ends', '-')} | {mib(m['peak_act_bytes'])} | "
                f"{mib(m['param_bytes'])} | {mib(m['grad_bytes'])} | {mib(m['optim_state_bytes'])} | "
                f"{mib(m.get('step_peak_bytes'))} | {mib(m.get('total_step_peak_bytes'))} | "
                f"{mib(m.get('estimated_total_step_peak_bytes'))} | "
                f"{mib(m['peak_rss_bytes'])} | {mib(m['cuda_peak_allocated_above_baseline'])} | "
                f"{mib(m['cuda_peak_reserved_above_baseline'])} |"
            )
    timed = [r for r in results["rows"] if "speed" in r]
    if timed:
        s0 = timed[0]["speed"]
        lines += [
            "",
            f"Speed: median over {len(s0['rounds_images_per_s'])} interleaved rounds of {s0['block_steps']} timed "
            f"steps (after {s0['warmup_steps']} warm-up steps), batch {s0['batch_size']}; ratio = median of the "
            "per-round ratios to E2E; first step = the first warm-up step alone (with +compile, mostly compile time).",
            "",
            "| method | K | step ms | images/s (min–max) | vs E2E (min–max) | step time vs E2E | "
            "training FLOPs vs E2E | first step s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        e2e_flops = next(
            (r["flops"].get("train_step") for r in results["rows"] if r["method"] == "e2e" and "flops" in r), None
        )
        for r in timed:
            s = r["speed"]
            ips, ratios = s["rounds_images_per_s"], s["rounds_ratio_to_e2e"]
            ratio = "-" if not ratios else f"{s['ratio_to_e2e']:.3f} ({min(ratios):.3f}–{max(ratios):.3f})"
            time_ratio = 1 / s["ratio_to_e2e"] if ratios and s["ratio_to_e2e"] else None
            flops = (r.get("flops") or {}).get("train_step")
            flops_ratio = flops / e2e_flops if flops and e2e_flops else None
            flag = " **(time > FLOPs +15 %)**" if time_ratio and flops_ratio and time_ratio > 1.15 * flops_ratio else ""
            lines.append(
                f"| {r['label']} | {r['k']} | {s['step_ms']:.1f} | {s['images_per_s']:.1f} "
                f"({min(ips):.1f}–{max(ips):.1f}) | {ratio} | {_fmt(time_ratio, '.3f')}{flag} | "
                f"{_fmt(flops_ratio, '.3f')} | {_fmt(s.get('first_step_s'), '.1f')} |"
            )
    notes = [f"memory input: {results['memory_data']}" if "memory_data" in results else None]
    notes.append(f"speed input: {results['speed_data']}" if "speed_data" in results else None)
    if machine:
        notes.append(
            f"machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs), load average "
            f"{load_text(machine.get('load_avg'))}"
            + (f" → {load_text(machine['load_avg_end'])}" if machine.get("load_avg_end") else "")
            + _allocator_note(machine.get("cpu_allocator"))
        )
    notes += [f"command ({c['date']}): `{c['command']}`" for c in results.get("commands", []) if c.get("command")]
    lines += ["", *[f"- {n}" for n in notes if n]]
    return "\n".join(lines)
