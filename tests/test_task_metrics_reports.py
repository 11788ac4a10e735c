"""``locallearn compare`` and ``locallearn plot`` report each task's headline metric: accuracy in %,
PSNR in dB, mAP@[.5:.95] as a fraction, never a PSNR multiplied by 100 under an accuracy label."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from locallearn.bench.plot import plot
from locallearn.bench.report import METRIC_LABELS, render_markdown
from locallearn.cli.main import main

from .conftest import tiny_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PNG = b"\x89PNG\r\n\x1a\n"
MiB = 2**20
needs_plot = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")

# The cell each task's compare table must show for a logged value, written out independently of report.py.
EXPECTED_CELL = {"acc": lambda v: f"{100 * v:.2f}%", "psnr": lambda v: f"{v:.2f}", "map": lambda v: f"{v:.3f}"}
FAST = ["run.max_steps=1", "run.progress=false"]
TASKS = {
    "acc": ("smoke/fmnist_dgl_k3.yaml", ["split.k=2"]),
    "psnr": ("sr/edsr_x2_dgl_k2.yaml", ["data.limit_test=1", "data.batch_size=2", "model.width=4"]),
    "map": (
        "detection/shapes_fcos_dgl_k2.yaml",
        ["data.limit_train=8", "data.limit_test=4", "data.batch_size=4", "data.eval_batch_size=4", "model.width=8"],
    ),
}


def table_cells(table: str) -> dict[str, str]:
    """method → its test-metric cell in a compare table."""
    rows = [line.split("|") for line in table.splitlines()[2:] if line.startswith("| ")]
    return {cells[1].strip(): cells[3].strip() for cells in rows}


@pytest.mark.parametrize("metric", list(TASKS))
def test_compare_reports_the_task_headline(metric: str, synthetic_root: Path, tmp_path: Path) -> None:
    if metric == "psnr" and importlib.util.find_spec("skimage") is None:
        pytest.skip("the SR preset trains on scikit-image's sample photographs")
    config, overrides = TASKS[metric]
    data = tiny_overrides(synthetic_root, tmp_path) if metric == "acc" else [f"run.out={tmp_path}"]
    argv = ["compare", "-c", str(CONFIGS / config), "--methods", "e2e,dgl", *data, *overrides, *FAST]
    assert main(argv) == 0
    out_dir = next(tmp_path.glob("*_compare"))
    record = json.loads((out_dir / "compare.json").read_text())
    table = (out_dir / "compare.md").read_text()
    assert record["metric"] == metric
    assert f"| test {METRIC_LABELS[metric]} (final head) |" in table.splitlines()[0]
    cells = table_cells(table)
    for row in record["rows"]:
        lines = (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        logged = [r[f"test_{metric}"] for r in map(json.loads, lines) if f"test_{metric}" in r]
        assert row[f"test_{metric}"] == logged[-1]
        assert cells[row["method"]] == EXPECTED_CELL[metric](logged[-1])
    if metric == "acc":  # classification keeps its header and JSON key
        header = "| method | K | test acc (final head) | peak activation MiB | vs E2E | images/s | vs E2E | train s |"
        assert table.splitlines()[0] == header
    else:  # the secondary metric (SSIM, mAP@.5) is kept in the JSON, and nothing is called accuracy
        assert all({"test_ssim", "test_map50"} & set(row) for row in record["rows"])
        assert "test_acc" not in json.dumps(record["rows"]) and "%" not in "".join(cells.values())


def bench_results(metric: str, values: list[float]) -> dict[str, Any]:
    """A bench record with an e2e and a dgl K=2 row, one seed each, measured by ``fit``'s memory meter."""
    rows = [{"key": f"{m}_k{k}", "label": m, "method": m, "k": k} for m, k in (("e2e", 1), ("dgl", 2))]
    runs = [
        {"key": row["key"], "metric": metric, f"test_{metric}": v, "peak_act_bytes": (i + 1) * MiB}
        for i, (row, v) in enumerate(zip(rows, values))
    ]
    config = {"model": {"name": "net", "width": 4}, "data": {"name": "data", "batch_size": 2}}
    return {"format": 1, "config": config, "metric": metric, "rows": rows, "runs": runs, "commands": []}


def test_bench_table_formats_map_with_three_decimals_and_accuracy_as_before() -> None:
    detection = render_markdown(bench_results("map", [0.1234, 0.5678]))
    assert "test mAP (mean ± std, n: each seed)" in detection
    assert f"| {0.1234:.3f} (n=1) | - |" in detection
    classification = render_markdown(bench_results("acc", [0.5, 0.25]))
    assert f"| {100 * 0.25:.2f}% (n=1) | - |" in classification


def write_run(path: Path, method: str, metric: str, tests: list[float], aux: list[float | None]) -> None:
    """A run directory as ``fit`` leaves it: config.yaml and one evaluated metrics record per epoch."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}, "run": {"seed": 0}}))
    records = [
        {"epoch": e + 1, "train_loss": [1.0] * (len(aux) + 1), f"test_{metric}": v, f"aux_{metric}": aux}
        for e, v in enumerate(tests)
    ]
    if metric == "psnr":  # SSIM is logged beside PSNR but is not the headline
        records = [{**r, "test_ssim": 0.5} for r in records]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """file name → the y label and the y values of every line and error bar of the figure saved under it."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    seen: dict[str, dict[str, Any]] = {}
    real_savefig = Figure.savefig

    def spy(fig: Figure, fname: Any, *args: Any, **kw: Any) -> None:
        ax = fig.axes[0]
        lines = [list(line.get_ydata()) for line in ax.get_lines()]
        bars = [list(c.lines[0].get_ydata()) for c in ax.containers if hasattr(c, "has_yerr")]
        seen[Path(fname).name] = {"ylabel": ax.get_ylabel(), "lines": lines, "errorbars": bars}
        real_savefig(fig, fname, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


@needs_plot
@pytest.mark.parametrize("metric,factor,unit", [("psnr", 1, "(dB)"), ("map", 1, "mAP"), ("acc", 100, "(%)")])
def test_plot_draws_the_headline_in_its_unit(metric: str, factor: int, unit: str, tmp_path: Path, figures) -> None:
    tests, aux = [0.25, 0.5], [0.125, None]  # one aux head without the task's prediction (None)
    write_run(tmp_path / "runs" / "dgl", "dgl", metric, tests, aux)
    bench_values = [0.75, 0.375]
    (tmp_path / "results.json").write_text(json.dumps(bench_results(metric, bench_values)))
    written = plot([tmp_path], tmp_path / "figures")
    assert {p.name for p in written} == {
        "accuracy_vs_epoch.png",
        "aux_accuracy_by_depth.png",
        "accuracy_vs_memory.png",
        "memory_vs_k.png",
    }
    for p in written:
        assert p.read_bytes().startswith(PNG)
    names = ("accuracy_vs_epoch", "aux_accuracy_by_depth", "accuracy_vs_memory")
    by_epoch, by_depth, vs_memory = (figures[f"{name}.png"] for name in names)
    assert all(unit in f["ylabel"] for f in (by_epoch, by_depth, vs_memory))
    assert by_epoch["lines"] == [[factor * v for v in tests]]
    assert by_depth["lines"] == [[factor * aux[0], factor * tests[-1]]]
    assert vs_memory["errorbars"] == [[factor * v] for v in bench_values]


@needs_plot
def test_plot_refuses_runs_of_different_tasks(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "sr", "dgl", "psnr", [0.25], [])
    write_run(tmp_path / "cls", "dgl", "acc", [0.25], [])
    with pytest.raises(ValueError, match="acc, psnr"):
        plot([tmp_path / "sr", tmp_path / "cls"], tmp_path / "figures")
    (tmp_path / "results.json").write_text(json.dumps(bench_results("map", [0.25, 0.5])))
    assert main(["plot", str(tmp_path / "results.json"), str(tmp_path / "sr"), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "map, psnr" in err and "plot each task separately" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "figures").exists() and not (tmp_path / "f").exists()


def test_progress_line_leaves_out_a_training_metric_the_task_does_not_have() -> None:
    """Detection logs train_map as NaN (no per-batch mAP); the progress line must not print ``train_map nan``."""
    from locallearn.train.rundir import format_row as _row

    record = {"epoch": 1, "step": 10, "lr": 0.1, "train_loss": [1.0, 0.5], "imgs_per_s": 50.0, "epoch_time_s": 2.0}
    assert "train_map" not in _row({**record, "train_map": float("nan"), "test_map": 0.2}, "map")
    assert "test_map 0.2000" in _row({**record, "train_map": float("nan"), "test_map": 0.2}, "map")
    assert "train_acc 0.7500" in _row({**record, "train_acc": 0.75}, "acc")
