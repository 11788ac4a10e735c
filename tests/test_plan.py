"""``locallearn plan``: predicted peaks from the meta device against the allocator-level peak of a real step, the
choice it makes under a budget, and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.cli.main import main
from locallearn.data.datasets import dataset_spec
from locallearn.measure import AllocatorPeak
from locallearn.tasks.task import Batch
from locallearn.train import load_config
from locallearn.train.build import build_engine
from locallearn.train.estimate import meta_batch
from locallearn.train.plan import _state_bytes, parse_bytes, plan, predicted_peaks

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "fmnist" / "demo.yaml")


def measured_peak(cfg) -> int:
    """Parameters, gradients, optimizer state and frozen copies + the CPU allocator's peak of a steady-state step."""
    torch.set_num_threads(1)
    shape = meta_batch(cfg).input.shape
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    x = (raw.float() / 255 - 0.3).contiguous(memory_format=torch.channels_last)
    batch = Batch(x, torch.randint(0, 10, (shape[0],), generator=g), raw)
    engine = build_engine(cfg, dataset_spec(cfg.data.name), torch.device("cpu"), x)
    engine.train_step(batch)
    with AllocatorPeak("cpu") as step:
        engine.train_step(batch)
    return _state_bytes(engine, range(engine.k)) + step.peak


@pytest.mark.parametrize("method", [["method.name=e2e", "split.k=1"], ["method.name=infopro", "split.k=2"]])
def test_predicted_peak_is_within_5_percent_of_the_measured_one(method: list[str]) -> None:
    cfg = load_config(DEMO, ["data.batch_size=64", *method])
    predicted, measured = predicted_peaks(cfg)[0], measured_peak(cfg)
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def test_plan_picks_the_smallest_k_that_fits_and_reports_the_closest_otherwise(capsys) -> None:
    cfg = load_config(DEMO, ["data.batch_size=64"])
    _, candidates = plan(cfg, 2**40)
    peaks = {c.k: c.peak_at_batch for c in candidates}
    budget = min(peaks.values()) + 1  # only the leanest K fits the configured batch
    chosen, _ = plan(cfg, budget)
    assert chosen is not None and chosen.k == min(peaks, key=peaks.get) and chosen.peak_at_batch <= budget
    chosen, candidates = plan(cfg, 4 * 2**20)  # 4 MiB: batch 64 fits nowhere
    assert chosen is None and all(c.largest_batch < 64 for c in candidates)
    assert main(["plan", "-c", DEMO, "--memory", "1KiB", "data.batch_size=64"]) == 0
    assert "nothing fits, not even batch 2" in capsys.readouterr().out
    two = plan(load_config(DEMO, ["data.batch_size=64"]), 2**40, devices=2)[1]
    assert [c.k for c in two] == [2] and two[0].peak_at_batch < peaks[2]  # a stage holds less than the whole


def test_memory_sizes_parse_and_bad_ones_are_one_line(capsys) -> None:
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 2**30 and parse_bytes("512M") == 2**29
    assert main(["plan", "-c", DEMO, "--memory", "lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("locallearn: error: --memory 'lots'") and "\n" not in err
