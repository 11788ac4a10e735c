"""``locallearn bench pareto``: local learning against activation checkpointing, on every axis at once.

    locallearn bench pareto -c configs/fmnist/resnet32_k8_study.yaml --k 8 \
        --methods e2e,e2e+ckpt,dgl,dgl+ckpt,infopro,dgl+man,dgl+hpff,dgl+mlaan \
        --accuracy benchmarks/accuracy_fmnist_full/results.json --out benchmarks/pareto_resnet32_k8

One table and one figure for one config and K: test accuracy (from an accuracy study's ``results.json``), the total
step peak (every allocation of a training step plus parameters, gradients and optimizer state:
:class:`~locallearn.measure.memory.AllocatorPeak`), the measured step time, and the training FLOPs of a whole step
(forward, every backward, cascade hops, recomputation). A ``+ckpt`` row takes its accuracy from the same row without
checkpointing: checkpointing leaves every step bitwise unchanged (``tests/test_checkpointing.py``). A row is on the
frontier when no other row has less memory, less time and at least its accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plot import place_labels
from .report import METRIC_LABELS, accuracy_summary, format_accuracy, setting_line, task_metric

MiB = 2**20


def _accuracy(study: dict[str, Any] | None, label: str, k: int) -> dict[str, Any] | None:
    if study is None:
        return None
    base = label.replace("+ckpt", "")
    key = f"{base}|k{k}"
    return accuracy_summary(study, key)


def pareto_rows(results: dict[str, Any], study: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One dict per measured row: accuracy, total step peak, step time, training FLOPs, each also relative to E2E,
    and whether the row is on the (memory, time, accuracy) frontier."""
    rows = []
    for row in results["rows"]:
        memory, speed, flops = row.get("memory") or {}, row.get("speed") or {}, row.get("flops") or {}
        rows.append(
            {
                "label": row["label"],
                "method": row["method"],
                "k": row["k"],
                "accuracy": _accuracy(study, row["label"], row["k"]),
                "total_peak": memory.get("total_step_peak_bytes"),
                "saved_act": memory.get("peak_act_bytes"),
                "step_ms": speed.get("step_ms"),
                "train_flops": flops.get("train_step"),
            }
        )
    e2e = next((r for r in rows if r["label"] == "e2e"), None)
    for r in rows:
        for key in ("total_peak", "step_ms", "train_flops"):
            ref = e2e[key] if e2e else None
            r[f"{key}_ratio"] = r[key] / ref if r[key] is not None and ref else None
    for r in rows:
        mean = r["accuracy"]["mean"] if r["accuracy"] else None
        r["frontier"] = None
        if mean is not None and r["total_peak"] is not None and r["step_ms"] is not None:
            r["frontier"] = not any(
                o is not r
                and o["accuracy"]
                and o["total_peak"] is not None
                and o["step_ms"] is not None
                and o["total_peak"] <= r["total_peak"]
                and o["step_ms"] <= r["step_ms"]
                and o["accuracy"]["mean"] >= mean
                and (o["total_peak"], o["step_ms"], o["accuracy"]["mean"]) != (r["total_peak"], r["step_ms"], mean)
                for o in rows
            )
    return rows


def render_pareto(results: dict[str, Any], study: dict[str, Any] | None, source: str | None) -> str:
    metric = task_metric(study) if study else "acc"
    rows = pareto_rows(results, study)
    lines = [
        setting_line(results),
        "",
        f"| method | K | test {METRIC_LABELS.get(metric, metric)} | total step peak MiB | vs E2E | step ms | vs E2E | "
        "training GFLOPs | vs E2E | frontier |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        acc_text = format_accuracy(metric, r["accuracy"])
        peak = None if r["total_peak"] is None else r["total_peak"] / MiB
        flops = None if r["train_flops"] is None else r["train_flops"] / 1e9
        frontier = {True: "yes", False: "", None: "-"}[r["frontier"]]
        lines.append(
            f"| {r['label']} | {r['k']} | {acc_text} | {fmt(peak, '.1f')} | {fmt(r['total_peak_ratio'], '.3f')} | "
            f"{fmt(r['step_ms'], '.1f')} | {fmt(r['step_ms_ratio'], '.3f')} | {fmt(flops, '.2f')} | "
            f"{fmt(r['train_flops_ratio'], '.3f')} | {frontier} |"
        )
    lines += [
        "",
        "- total step peak: every allocation of one training step above its start (CPU: profiler memory events; "
        "CUDA: max_memory_allocated) plus parameters, gradients, optimizer state and frozen EMA copies",
        "- step ms: median over interleaved rounds (bench speed); training GFLOPs: one whole train_step "
        "(forward, every backward, cascade hops, checkpoint recomputation)",
        f"- accuracy: {source or 'no study given'}; a +ckpt row has its base row's accuracy (checkpointing is "
        "bitwise identical per step)",
    ]
    return "\n".join(lines)


def plot_pareto(results: dict[str, Any], study: dict[str, Any] | None, path: Path) -> Path | None:
    """Accuracy against total step peak, each point labelled with its step time relative to E2E."""
    rows = [r for r in pareto_rows(results, study) if r["accuracy"] and r["total_peak"] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = task_metric(study) if study else "acc"
    scale = 100 if metric == "acc" else 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = []
    for r in rows:
        kind = "E2E" if r["method"] == "e2e" else "local"
        marker = ("s" if "+ckpt" in r["label"] else "*") if kind == "E2E" else ("D" if "+ckpt" in r["label"] else "o")
        y = scale * r["accuracy"]["mean"]
        ax.errorbar(
            r["total_peak"] / MiB,
            y,
            yerr=scale * r["accuracy"]["std"],
            fmt=marker,
            capsize=3,
            color="C3" if r["frontier"] else "C0",
        )
        time = f" ({r['step_ms_ratio']:.2f}× time)" if r["step_ms_ratio"] else ""
        labels.append((r["total_peak"] / MiB, y, r["label"] + time))
    place_labels(ax, labels)
    ax.set(
        xlabel="total step peak (MiB, allocator)",
        ylabel=f"test {METRIC_LABELS.get(metric, metric)}",
        title="Accuracy vs memory (red: on the memory-time-accuracy frontier)",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_pareto(out: Path, results: dict[str, Any], accuracy: str | None) -> list[Path]:
    """``pareto.md`` (and ``pareto.png`` when accuracy is known) in ``out``."""
    study = json.loads(Path(accuracy).read_text()) if accuracy else None
    (out / "pareto.md").write_text(render_pareto(results, study, accuracy) + "\n")
    written = [out / "pareto.md"]
    png = plot_pareto(results, study, out / "pareto.png")
    return written + ([png] if png else [])
