"""Throughput partitioning (``split.balance: time``): split points from measured unit and aux-net times."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from locallearn import ClassificationTask, MethodCfg, create_model
from locallearn.local.split import balanced_split
from locallearn.train import split as split_module
from locallearn.train.config import OptimCfg, SplitCfg, load_config
from locallearn.train.engine import LocalEngine
from locallearn.train.entry import fit
from locallearn.train.split import (
    candidate_splits,
    measure_unit_times,
    time_balanced_ends,
    time_balanced_split,
)

from .conftest import tiny_overrides
from .test_engine import make_batch


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=8).flatmap(
        lambda c: st.tuples(st.just(c), st.integers(1, len(c)))
    )
)
def test_split_with_end_costs_minimises_the_slowest_module(case: tuple[list[tuple[int, int]], int]) -> None:
    """A module over [s, e) costs Σ unit[s:e] + end[e-1]; the split is optimal against brute force."""
    pairs, k = case
    unit, end = [p[0] for p in pairs], [p[1] for p in pairs]

    def bottleneck(ends: tuple[int, ...]) -> int:
        return max(sum(unit[s:e]) + end[e - 1] for s, e in zip((0, *ends[:-1]), ends))

    ends = balanced_split(unit, k, end_costs=end)
    best = min(bottleneck((*cuts, len(unit))) for cuts in itertools.combinations(range(1, len(unit)), k - 1))
    assert bottleneck(tuple(ends)) == best


def test_an_expensive_aux_net_moves_the_split_point() -> None:
    """Unit time alone puts the cut after the heavy unit 0; closing a module there also costs its aux net (a
    decoder on a large map), so the time-balanced split moves the cut one unit later."""
    assert time_balanced_ends([3.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], 2) == [1, 4]
    assert time_balanced_ends([3.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0], 2) == [2, 4]
    assert time_balanced_ends([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 10.0, 0.0], 2) == [2, 4]
    with pytest.raises(ValueError, match="end_costs has 3 entries for 4 units"):
        balanced_split([1, 1, 1, 1], 2, end_costs=[0, 0, 0])


def _build(split: SplitCfg, method: str = "dgl") -> LocalEngine:
    torch.manual_seed(0)
    backbone = create_model("resnet8", num_classes=4, in_channels=1, width=4)
    return LocalEngine(backbone, MethodCfg(name=method), ClassificationTask(4), OptimCfg(), split=split)


def test_probe_times_every_unit_and_its_aux_net() -> None:
    probe = _build(SplitCfg(k=5, preset="ends", ends=[1, 2, 3, 4, 5]), "infopro")
    unit_s, aux_s = measure_unit_times(probe, make_batch(n=8), repeats=1)
    assert len(unit_s) == len(aux_s) == 5 and all(t > 0 for t in unit_s + aux_s)
    assert all(p.grad is None for p in probe.backbone.parameters())  # the probe leaves no gradients behind
    with pytest.raises(ValueError, match="one module per unit"):
        measure_unit_times(_build(SplitCfg(k=2)), make_batch(n=8))


def test_time_balanced_split_returns_explicit_ends() -> None:
    split, seconds = time_balanced_split(SplitCfg(k=3, balance="time"), "dgl", _build, make_batch(n=8), 1)
    assert split.preset == "ends" and len(split.ends) == 3 and split.ends[-1] == 5 and split.k == 3
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert _build(split).ends == split.ends
    with pytest.raises(ValueError, match="balance=time is measured before the engine is built"):
        _build(SplitCfg(k=3, balance="time"))
    assert _build(SplitCfg(balance="time"), "e2e").ends == [5]  # one module: nothing to measure


def test_candidates_are_the_best_split_and_its_near_tied_neighbours() -> None:
    """Five equal units, K=2: [2, 5] and [3, 5] tie (slowest module 3 units); [1, 5] and [4, 5] (4 units) are
    33 % worse, outside a 10 % tolerance, inside a 40 % one; K=3 moves each boundary."""
    unit, aux = [1.0] * 5, [0.0] * 5
    assert candidate_splits(unit, aux, [2, 5]) == [[2, 5], [3, 5]]
    assert candidate_splits(unit, aux, [2, 5], tolerance=0.4) == [[2, 5], [3, 5], [1, 5]]
    assert candidate_splits(unit, aux, [2, 5], tolerance=0.4, limit=2) == [[2, 5], [3, 5]]
    assert candidate_splits([1.0] * 6, [0.0] * 6, [2, 4, 6], tolerance=0.6) == [
        [2, 4, 6],
        [1, 4, 6],
        [3, 4, 6],
        [2, 3, 6],
        [2, 5, 6],
    ]
    assert candidate_splits([1.0, 1.0], [0.0, 0.0], [2]) == [[2]]  # K=1: nothing to move


def test_whole_module_timing_settles_a_tie_the_unit_probe_cannot_see(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-unit probe is made to report five equal units, so [2, 5] and [3, 5] tie. In truth units 0-3 cost
    10 ms and unit 4 costs 40 ms (forward hooks sleep): [2, 5] is 20 / 60 ms, [3, 5] 30 / 50 ms. Timing the
    candidates' whole modules picks [3, 5] and reports its module times."""

    def sleepy_build(split: SplitCfg) -> LocalEngine:
        engine = _build(split)
        for u, unit in enumerate(engine.backbone.units):
            unit.register_forward_pre_hook(lambda *_, s=0.04 if u == 4 else 0.01: time.sleep(s))
        return engine

    assert time_balanced_ends([1.0] * 5, [0.0] * 5, 2) == [2, 5]  # what the unit probe alone picks
    monkeypatch.setattr(split_module, "measure_unit_times", lambda probe, batch, repeats: ([1.0] * 5, [0.0] * 5))
    split, seconds = time_balanced_split(SplitCfg(k=2, balance="time"), "dgl", sleepy_build, make_batch(n=8))
    assert split.ends == [3, 5]
    assert 0.03 <= seconds[0] < 0.06 and 0.05 <= seconds[1] < 0.085 and seconds[0] < seconds[1], (
        seconds
    )  # (sleeps: load only adds)


def test_fit_records_the_measured_split_so_resume_reuses_it(synthetic_root: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(synthetic_root, tmp_path), "method.name=dgl", "split.k=2", "split.balance=time"]
    cfg = load_config("configs/fmnist/demo.yaml", [*overrides, "run.epochs=1", "data.limit_train=128"])
    result = fit(cfg, quiet=True)
    saved = yaml.safe_load((Path(result["run_dir"]) / "config.yaml").read_text())
    assert saved["split"]["preset"] == "ends" and len(saved["split"]["ends"]) == 2
    resumed = fit(resume=result["run_dir"], overrides=["run.epochs=2"], quiet=True)
    assert resumed["epoch"] == 2
