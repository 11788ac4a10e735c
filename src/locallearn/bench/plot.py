"""``locallearn plot RUNS_OR_RESULTS... --out DIR``: PNG figures from run directories and bench results.

Inputs may be run directories (``metrics.jsonl``), bench folders or their ``results.json`` (a bench folder's
``runs/`` are read too), or any folder holding run directories. Figures, each written only when its data exists:

* ``accuracy_vs_epoch.png``: the test metric of the final head per run;
* ``aux_accuracy_by_depth.png``: the last-epoch metric of every aux head by module, and the final head;
* ``accuracy_vs_memory.png``: the test metric (mean ± std over seeds) vs memory, the headline chart of every
  local-learning paper. Memory is the total step peak of ``bench memory`` (allocator peak + parameters, gradients,
  optimizer state) when every point has one, since the saved-tensor meter cannot see recomputation (checkpointing,
  recomputed aux chains look free to it); otherwise the saved-tensor meter's peak (activations only, the same on
  any device);
* ``accuracy_vs_time.png``: the test metric vs training seconds (evaluation excluded);
* ``throughput.png``: images/s per (method, K), ratio to E2E on each bar;
* ``memory_vs_k.png``: peak activation memory vs K per method, E2E as a line.

A ``compare`` folder (``compare.json``) counts as a bench: its rows give accuracy vs memory, vs time and
throughput, its ``runs/`` the curves. A folder with neither a ``metrics.jsonl`` nor results (a run that failed
before its first epoch) is skipped with a one-line note. Every figure gives a method the same colour (by its name
without K), axes of epochs, depth and K have integer ticks, memory and time axes start at 0, markers are hollow so
that points on top of each other stay visible, and two runs with the same label get their folder name added.

The metric is the task's headline (``Task.headline``): accuracy in %, PSNR in dB or mAP@[.5:.95], read from the
records (``test_<name>`` with its ``aux_<name>`` list; a bench's ``metric``). The file names keep "accuracy" for
every task, so links to them stay valid. Inputs of different tasks are refused: one call, one metric axis.

matplotlib is an optional extra (``pip install 'locallearn[plot]'``), imported only here and with the Agg backend.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from ..train.rundir import read_records
from .report import shown_value, table_rows, task_metric

# What a headline metric is called on an axis, and its unit (None: a fraction, shown as logged).
METRIC_AXES = {"acc": ("accuracy", "%"), "psnr": ("PSNR", "dB"), "map": ("mAP@[.5:.95]", None)}


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plot needs matplotlib: pip install 'locallearn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _run_label(run_dir: Path, records: list[dict[str, Any]]) -> tuple[str, int]:
    """(what a run is called, its seed): a bench run by its name (``dgl+mlaan_k8_seed0`` → ``dgl+mlaan K=8``, the
    add-on preset as the study's table names it), a named run by its ``run.name``, any other by method, add-ons
    and K."""
    k = len(records[0].get("train_loss", [])) if records else "?"
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        seed, name = int(cfg["run"]["seed"]), cfg["run"].get("name")
        if name:
            bench = re.fullmatch(r"(.+)_k(\d+)_seed\d+", name)
            return (f"{bench[1]} K={bench[2]}" if bench else name), seed
        return "+".join([cfg["method"]["name"], *(cfg["method"].get("addons") or [])]) + f" K={k}", seed
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return run_dir.name, 0


def place_labels(ax: Any, points: list[tuple[float, float, str]], fontsize: float = 7) -> None:
    """Annotate each (x, y, text) beside its point, left to right, trying above-right, below-right, above-left and
    below-left in turn so that no label's box overlaps an earlier one's (boxes estimated from the text length, in
    points); a label moved from above-right gets a thin leader line to its point."""
    ax.autoscale_view()
    to_points = ax.transData + ax.figure.dpi_scale_trans.inverted()  # data -> inches
    boxes: list[tuple[float, float, float, float]] = []
    for x, y, text in sorted(points, key=lambda p: (p[0], -p[1])):  # left to right: a label lands by its point
        px, py = (72 * v for v in to_points.transform((x, y)))
        w, h = 0.6 * fontsize * len(text), 1.2 * fontsize
        for dx, dy, ha in ((4, 4, "left"), (4, -4 - h, "left"), (-4, 4, "right"), (-4, -4 - h, "right")):
            x0 = px + dx if ha == "left" else px + dx - w
            box = (x0, py + dy, x0 + w, py + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        leader = None if (dx, dy) == (4, 4) else {"arrowstyle": "-", "lw": 0.5, "color": "0.5"}
        ax.annotate(
            text, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords="offset points", ha=ha, arrowprops=leader
        )


def run_metric(records: list[dict[str, Any]]) -> str | None:
    """The headline a run was evaluated on: the name logged both as ``test_<name>`` and as the ``aux_<name>``
    list (``test_ssim``, ``test_map50`` have no aux list); None when the run never evaluated."""
    for r in records:
        for key in r:
            if key.startswith("aux_") and f"test_{key[4:]}" in r:
                return key[4:]
    return None


def inputs_metric(runs: dict[Path, list[dict[str, Any]]], benches: list[tuple[Path, dict[str, Any]]]) -> str:
    """The one headline every evaluated run and bench with accuracy runs shares (``acc`` when there are none)."""
    found = {m for m in map(run_metric, runs.values()) if m}
    found |= {r["metric"] if "table_rows" in r else task_metric(r) for _, r in benches if r.get("runs", True)}
    if len(found) > 1:
        raise ValueError(
            f"the inputs mix tasks with different metrics ({', '.join(sorted(found))}); plot each task separately"
        )
    return found.pop() if found else "acc"


def compare_rows(compare: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``compare.json``'s rows in :func:`~.report.table_rows`' shape (one seed: std 0, no total step peak)."""
    metric = f"test_{compare.get('metric', 'acc')}"
    e2e = next((r for r in compare["rows"] if r["method"] == "e2e"), None)
    rows = []
    for r in compare["rows"]:
        name, *addons = r["method"].split(":")[0].split("+")
        value = r.get(metric)
        rows.append(
            {
                "label": r["method"],
                "method": name,
                "addons": addons,
                "k": r["k"],
                "peak_act_mib": r.get("peak_act_mib"),
                "total_peak_mib": None,
                "images_per_s": r.get("imgs_per_s"),
                "speed_ratio": r["imgs_per_s"] / e2e["imgs_per_s"] if e2e and r.get("imgs_per_s") else None,
                "accuracy": None if value is None else {"mean": value, "std": 0.0, "n": 1},
                "train_s": r.get("train_s"),
            }
        )
    return rows


def collect(inputs: list[str | Path]) -> tuple[dict[Path, list[dict[str, Any]]], list[tuple[Path, dict[str, Any]]]]:
    """(run dir → metrics records, [(results.json or compare.json path, results)]) found under ``inputs``; a
    compare's results hold its rows already in table form (``table_rows``)."""
    runs: dict[Path, list[dict[str, Any]]] = {}
    benches: list[tuple[Path, dict[str, Any]]] = []

    def add_run(d: Path) -> None:
        runs[d] = read_records(d / "metrics.jsonl")  # the epoch records

    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"{item}: no such file or directory")
        results = item if item.is_file() else item / "results.json"
        compared = item if item.is_file() else item / "compare.json"
        found = False
        if compared.is_file() and compared.name == "compare.json":
            data = json.loads(compared.read_text())
            benches.append((compared, {"metric": data.get("metric", "acc"), "table_rows": compare_rows(data)}))
            item, found = compared.parent, True
        elif results.is_file():
            if results.name != "results.json":
                raise ValueError(f"{item}: expected a run directory, a bench folder or its results.json")
            benches.append((results, json.loads(results.read_text())))
            item, found = results.parent, True
        if (item / "metrics.jsonl").is_file():
            add_run(item)
            found = True
        for sub in sorted([*item.glob("*/metrics.jsonl"), *item.glob("runs/*/metrics.jsonl")]):
            add_run(sub.parent)
            found = True
        if not found:
            print(
                f"plot: skipping {item}: no metrics.jsonl or results here (a run that ended before its first epoch?)",
                file=sys.stderr,
            )
    return runs, benches


def memory_axis(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(table-row key, axis label) of the accuracy-vs-memory figure: the total step peak when every row has one
    (the saved-tensor meter cannot see recomputation), else the saved-activation peak."""
    if rows and all(r["total_peak_mib"] for r in rows):
        return "total_peak_mib", "total step peak (MiB: allocator peak + parameters, gradients, optimizer state)"
    return "peak_act_mib", "peak activation memory (MiB, saved-tensor meter)"


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (memory, score) points no other point beats on both (less memory and a higher score), by memory."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def plot(inputs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write every figure the inputs support into ``out_dir``; return their paths."""
    plt = _import_pyplot()
    runs, benches = collect(inputs)
    metric = inputs_metric(runs, benches)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, filename: str) -> None:
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        plt.close(fig)
        written.append(out / filename)

    name, unit = METRIC_AXES.get(metric, (metric, None))
    axis = name + (f" ({unit})" if unit else "")
    test, aux = f"test_{metric}", f"aux_{metric}"

    rows = [(path, r) for path, res in benches for r in res.get("table_rows") or table_rows(res)]
    row_order = {f"{r['label']} K={r['k']}": i for i, (_, r) in enumerate(rows)}  # runs in their table's order
    named = sorted(
        ((_run_label(d, recs), [r for r in recs if test in r], d) for d, recs in runs.items()),
        key=lambda item: (row_order.get(item[0][0], len(row_order)), item[0]),
    )
    methods = [r["label"] for _, r in rows] + [who for (who, _), _, _ in named]
    colour = method_colours(methods)
    twice = {key for key in ((w, s) for (w, s), _, _ in named) if sum(k == key for k, _, _ in named) > 1}

    def line(who: str, seed: int, run_dir: Path) -> dict[str, Any]:  # a colour per method, a line style per seed
        label = f"{who} seed {seed}" + (f" ({run_dir.name})" if (who, seed) in twice else "")
        return {"color": colour[method_of(who)], "linestyle": ("-", "--", ":", "-.")[seed % 4], "label": label}

    if any(evals for _, evals, _ in named):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (who, seed), evals, run_dir in named:
            if evals:
                values = [shown_value(metric, r[test]) for r in evals]
                ax.plot([r["epoch"] for r in evals], values, **HOLLOW, **line(who, seed, run_dir))
        ax.set(xlabel="epoch", ylabel=f"test {axis}", title=f"Test {name} of the final head")
        integer_ticks(ax.xaxis)
        legend(ax)
        ax.grid(alpha=0.3)
        save(fig, "accuracy_vs_epoch.png")

    with_aux = [(run, ev[-1], d) for run, ev, d in named if ev and any(a is not None for a in ev[-1][aux])]
    if with_aux:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (who, seed), last, run_dir in with_aux:
            values = [*last[aux], last[test]]
            pts = [(i + 1, shown_value(metric, v)) for i, v in enumerate(values) if v is not None]
            style = line(who, seed, run_dir)  # the epoch says which runs were still training
            ax.plot(*zip(*pts), **HOLLOW, **{**style, "label": f"{style['label']}, epoch {last['epoch']}"})
        ax.set(xlabel="module (depth)", ylabel=axis, title=f"Aux {name} by depth after each run's last epoch")
        integer_ticks(ax.xaxis)
        legend(ax)
        ax.grid(alpha=0.3)
        save(fig, "aux_accuracy_by_depth.png")

    tag = len(benches) > 1
    pts = [(p, r) for p, r in rows if r["accuracy"] and r["peak_act_mib"] is not None]
    memory_key, memory_label = memory_axis([r for _, r in pts])
    for x_of, x_label, title, filename in (
        (memory_key, memory_label, "training memory", "accuracy_vs_memory.png"),
        ("train_s", "training seconds (evaluation excluded)", "training time", "accuracy_vs_time.png"),
    ):
        shown = [(p, r) for p, r in pts if r.get(x_of) is not None]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        kinds = {"E2E": ("*", 12), "base method": ("o", 8), "with add-ons": ("^", 8)}
        for kind, (marker, size) in kinds.items():  # the legend: marker = kind, colour = method
            ax.plot([], [], marker, markersize=size, mfc="none", color="0.3", label=kind)
        for _, r in shown:
            mean, std = (shown_value(metric, r["accuracy"][key]) for key in ("mean", "std"))
            kind = "E2E" if r["method"] == "e2e" else ("with add-ons" if r["addons"] else "base method")
            marker, size = kinds[kind]
            ax.errorbar(
                r[x_of],
                mean,
                yerr=std,
                fmt=marker,
                markersize=size,
                capsize=3,
                mfc="none",
                mew=1.5,
                color=colour[method_of(r["label"])],
            )
        place_labels(ax, [(r[x_of], shown_value(metric, r["accuracy"]["mean"]), _name(p, r, tag)) for p, r in shown])
        frontier = pareto_front([(r[x_of], shown_value(metric, r["accuracy"]["mean"])) for _, r in shown])
        ax.step(*zip(*frontier), where="post", color="0.6", lw=1, ls="--", label="frontier (less, higher)")
        ax.set(xlabel=x_label, ylabel=f"test {axis}", title=f"Test {name} vs {title}")
        ax.set_xlim(left=0, right=1.15 * max(r[x_of] for _, r in shown))
        legend(ax)
        ax.grid(alpha=0.3)
        save(fig, filename)

    timed = [(p, r) for p, r in rows if r["images_per_s"] is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(timed)), 4.5))
        names = [_name(p, r, tag) for p, r in timed]
        bars = ax.bar(
            range(len(timed)),
            [r["images_per_s"] for _, r in timed],
            color=[colour[method_of(r["label"])] for _, r in timed],
        )
        for bar, (_, r) in zip(bars, timed):
            if r["speed_ratio"] is not None:
                ax.annotate(
                    f"×{r['speed_ratio']:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(range(len(timed)), names, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="training images/s", title="Throughput (×: ratio to E2E)")
        save(fig, "throughput.png")

    by_method: dict[str, list[tuple[int, float]]] = {}
    e2e_lines = []
    for path, r in rows:
        if r["peak_act_mib"] is None:
            continue
        if r["method"] == "e2e":
            e2e_lines.append((_name(path, {**r, "k": 1}, tag), r["peak_act_mib"]))
        else:
            by_method.setdefault(_name(path, {**r, "k": None}, tag), []).append((r["k"], r["peak_act_mib"]))
    if by_method:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, series in by_method.items():
            ax.plot(*zip(*sorted(series)), **HOLLOW, color=colour[method_of(label.split(": ")[-1])], label=label)
        for label, mib in e2e_lines:
            ax.axhline(mib, linestyle="--", color="gray", label=label)
        ax.set(xlabel="K (local modules)", ylabel="peak activation memory (MiB)", title="Activation memory vs K")
        ax.set_xscale("log", base=2)
        ks = sorted({k for series in by_method.values() for k, _ in series})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        legend(ax)
        ax.grid(alpha=0.3)
        save(fig, "memory_vs_k.png")

    if not written:
        raise ValueError("nothing to plot: the inputs hold no evaluated epochs and no bench rows")
    return written


HOLLOW = {"marker": "o", "markersize": 6, "mfc": "none", "mew": 1.5}  # overlapping points stay visible


def legend(ax: Any) -> None:
    """The legend inside the axes, or beside them when it has more than 8 entries (it would hide the data)."""
    if len(ax.get_legend_handles_labels()[1]) > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    else:
        ax.legend(fontsize=7)


def integer_ticks(axis: Any) -> None:
    """Ticks on whole numbers only (epochs, modules)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def method_of(label: str) -> str:
    """A row or run label without its K: ``dgl+mlaan K=4`` → ``dgl+mlaan`` (one colour per method)."""
    return label.split(" K=")[0]


def method_colours(labels: list[str]) -> dict[str, str]:
    """Every method (label without K) its own colour, in order of first appearance, the same in every figure."""
    return {m: f"C{i % 10}" for i, m in enumerate(dict.fromkeys(method_of(label) for label in labels))}


def _name(path: Path, r: dict[str, Any], tag: bool) -> str:
    name = r["label"] if r["k"] is None else f"{r['label']} K={r['k']}"
    return f"{path.parent.name}: {name}" if tag else name
