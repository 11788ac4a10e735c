"""``log.tensorboard=true``: the scalars of every metrics record, read back with TensorBoard's own event reader,
equal the JSONL log (single-process and PPLL runs; PPLL writes from rank 0, which gathers every stage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from locallearn.parallel.ppll import spawn_ppll
from locallearn.train import fit, load_config
from locallearn.train.rundir import read_records, tensorboard_scalars

from .conftest import tiny_overrides

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_events_match_jsonl(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    records = read_records(run_dir / "metrics.jsonl")
    events = read_events(run_dir)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in tensorboard_scalars(record).items():
            expected.setdefault(tag, []).append((record["step"], value))
    assert set(events) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events
    return events


def test_single_process_run_writes_the_jsonl_scalars_as_events(synthetic_root: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(synthetic_root, tmp_path), "method.name=dgl", "split.k=3", "log.tensorboard=true"]
    result = fit(load_config("configs/smoke/fmnist_dgl_k3.yaml", overrides), quiet=True)
    events = assert_events_match_jsonl(Path(result["run_dir"]))
    for tag in ("lr", "test_acc", "imgs_per_s", "peak_act_bytes", "train_loss/module_0", "train_loss/module_2"):
        assert len(events[tag]) == 2, tag  # two epochs
    assert "aux_acc/module_1" in events


def test_ppll_run_writes_events_from_rank_zero(synthetic_root: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(synthetic_root, tmp_path), "method.name=dgl", "split.k=2", "run.threads=1"]
    cfg = load_config(None, [*overrides, "parallel=ppll", "log.tensorboard=true", "model.width=4"])
    result = spawn_ppll(cfg, 2, timeout=240)
    events = assert_events_match_jsonl(Path(result["run_dir"]))
    assert {"train_loss/module_0", "train_loss/module_1", "busy_fraction/module_1", "test_acc"} <= set(events)


def test_tensorboard_missing_is_one_line_before_work(monkeypatch, tmp_path: Path, capsys) -> None:
    """Without the ``tb`` extra, ``log.tensorboard=true`` is refused before any data is read."""
    from locallearn.cli.main import main

    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)  # import tensorboard -> ImportError
    argv = ["train", "-c", "configs/fmnist/demo.yaml", f"run.out={tmp_path}", f"data.root={tmp_path / 'none'}"]
    assert main([*argv, "log.tensorboard=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'locallearn[tb]'" in err and "\n" not in err
