"""Classic pipeline baselines (GPipe, 1F1B) and DDP against single-process E2E, the throughput simulator's formulas
(docs/pipeline.md, "The simulator"), the steady-state bookkeeping, and ``locallearn bench pipeline`` end to end on
tiny settings."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locallearn.bench.bench import bench_batches
from locallearn.bench.simulate import (
    StageCosts,
    default_micro,
    e2e_step,
    pipeline_stage_times,
    pipeline_step,
    ppll_fill,
    ppll_step,
    predict,
    sequential_step,
)
from locallearn.bench.variants import Variant, variant_config
from locallearn.cli.main import main
from locallearn.data.datasets import dataset_spec
from locallearn.parallel.pipeline_baselines import RunOpts, spawn_run, steady_state
from locallearn.tasks.task import Batch
from locallearn.train.build import build_engine
from locallearn.train.config import load_config

from .conftest import tiny_overrides

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "fmnist" / "demo.yaml")
# float32 on CPU. The pipeline sums the micro-batch gradients and divides by M once, the oracle scales each
# micro-batch loss by 1/M before its backward, DDP averages two shards with an all-reduce: the same mathematics,
# free to round differently. Measured here: 0.0 (GPipe M=2, DDP) on gradients of order 1e-1, while the full-batch
# step differs by ~8e-2 (BatchNorm statistics per micro-batch), so ATOL separates the two by far.
ATOL = 1e-6


def _e2e_oracle(cfg, batch: Batch, chunks: int) -> tuple[dict, dict, dict]:
    """Single-process E2E: mean task loss over ``chunks`` equal micro-batches accumulated in order, one SGD step.
    Returns (initial parameters, gradients, parameters after the step), keyed like the backbone."""
    engine = build_engine(cfg, dataset_spec(cfg.data.name), torch.device("cpu"), batch.input)
    initial = {n: p.detach().clone() for n, p in engine.backbone.named_parameters()}
    engine.backbone.train()
    for x, y in zip(batch.input.chunk(chunks), batch.target.chunk(chunks)):
        (engine.task.loss(engine.modules[0](x), Batch(x, y)) / chunks).backward()
    grads = {n: p.grad.clone() for n, p in engine.backbone.named_parameters()}
    engine.step_module(0)
    return initial, grads, {n: p.detach().clone() for n, p in engine.backbone.named_parameters()}


def _backbone_keys(stage_dict: dict, start: int) -> dict:
    """Stage module keys ``3.conv1.weight`` → backbone keys ``units.<start+3>.conv1.weight``."""
    out = {}
    for key, value in stage_dict.items():
        index, rest = key.split(".", 1)
        out[f"units.{start + int(index)}.{rest}"] = value
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.timeout(180)
def test_bench_ppll_with_sent_labels_trains_the_same_stages(synthetic_root: Path, tmp_path: Path) -> None:
    """``bench pipeline ... ppll.labels=send`` times PPLL with the targets travelling as DATA messages; the stages
    end bitwise where the loader mode ends (and the protocol checks would fail on a DATA/TRAIN mix-up)."""
    base = load_config(None, tiny_overrides(synthetic_root, tmp_path) + ["model.width=4", "method.name=dgl"])
    ll_cfg = variant_config(base, Variant("dgl", None, 2))
    batches, _ = bench_batches(ll_cfg, torch.device("cpu"), 2)
    opts = {"warmup": 1, "steps": 2, "keep_state": True, "timeout": 60}
    jobs = [("ppll", ll_cfg, RunOpts(labels=labels, **opts)) for labels in ("send", "loader")]
    sent, read = spawn_run(jobs, 2, batches, timeout=150)
    for a, b in zip(sent, read):
        assert _max_diff(a["state"], b["state"]) == 0


@pytest.mark.timeout(180)
def test_gpipe_1f1b_and_ddp_match_single_process_e2e(synthetic_root: Path, tmp_path: Path) -> None:
    """After one step on 2 gloo processes, every stage's gradients and parameters equal single-process E2E with
    the same micro-batches (GPipe M=2, 1F1B M=4 on the DGL K=2 split; DDP: 2 shards), within ATOL; and the step
    moved the parameters far more than ATOL, so a wrong gradient (unscaled, a missing micro-batch) would fail."""
    base = load_config(None, tiny_overrides(synthetic_root, tmp_path) + ["model.width=4", "method.name=dgl"])
    ll_cfg = variant_config(base, Variant("dgl", None, 2))
    e2e_cfg = variant_config(base, Variant("e2e", None, 1))
    batches, _ = bench_batches(ll_cfg, torch.device("cpu"), 1)
    opts = {"warmup": 1, "steps": 0, "keep_state": True, "timeout": 60}
    jobs = [
        ("gpipe", ll_cfg, RunOpts(micro=2, **opts)),
        ("1f1b", ll_cfg, RunOpts(micro=4, **opts)),
        ("ddp", e2e_cfg, RunOpts(**opts)),
    ]
    results = spawn_run(jobs, 2, batches, timeout=150)
    for (kind, _, run_opts), ranks in zip(jobs, results):
        chunks = 2 if kind == "ddp" else run_opts.micro
        initial, grads, after = _e2e_oracle(e2e_cfg, batches[0], chunks)
        got_grads, got_after = {}, {}
        if kind == "ddp":  # every rank holds the whole network; both must equal the oracle
            for rank in ranks:
                assert _max_diff(rank["grads"], grads) < ATOL, kind
                params = {n: rank["state"][n] for n in after}  # BN running statistics are per shard: not compared
                assert _max_diff(params, after) < ATOL, kind
            got_after = {n: ranks[0]["state"][n] for n in after}
        else:
            starts = [0, *ranks[0]["module_ends"][:-1]]
            for rank, start in zip(ranks, starts):
                got_grads.update(_backbone_keys(rank["grads"], start))
                got_after.update(_backbone_keys({n: rank["state"][n] for n in rank["grads"]}, start))
            assert _max_diff(got_grads, grads) < ATOL, kind
            assert _max_diff(got_after, after) < ATOL, kind
        assert _max_diff(got_after, initial) > 100 * ATOL, f"{kind}: the step barely moved the parameters"
        full_batch = _e2e_oracle(e2e_cfg, batches[0], 1)[2]
        assert _max_diff(got_after, full_batch) > 100 * ATOL, f"{kind}: micro-batching should be visible (BN)"


def test_steady_state_from_step_end_times() -> None:
    """A step ends when its latest rank does; throughput over the steps after warm-up; busy per rank over its own
    steps after warm-up; fill = the first step."""
    ranks = [
        {"step_end_s": [1.0, 2.0, 3.0, 4.0], "busy": [0.5, 0.5, 0.5, 0.5]},
        {"step_end_s": [1.5, 2.5, 3.5, 4.5], "busy": [1.0, 0.8, 0.9, 1.0]},
    ]
    m = steady_state(ranks, warmup=1, batch_size=10)
    assert m["samples_per_s"] == pytest.approx(3 * 10 / (4.5 - 1.5))
    assert m["step_ms"] == pytest.approx(1000.0)
    assert m["fill_s"] == 1.5 and m["warmup_s"] == 1.5
    assert m["busy_fraction"] == pytest.approx([1.5 / 3.0, 2.7 / 3.0])
    assert steady_state([{"step_end_s": [1.0, 3.0], "busy": None}], 1, 4)["busy_fraction"] == [None]
    with pytest.raises(ValueError, match="warmup"):
        steady_state(ranks, warmup=4, batch_size=10)


def test_simulator_formulas_on_hand_computed_stage_times() -> None:
    c = StageCosts(
        batch_size=64,
        ll=[0.06, 0.08],
        fwd={1: [0.02, 0.03], 4: [0.005, 0.01]},
        bwd={1: [0.04, 0.05], 4: [0.01, 0.012]},
        opt=[0.001, 0.002],
        comm={1: [0.01], 4: [0.003]},
    )
    assert sequential_step(c) == pytest.approx(0.14)
    assert ppll_step(c) == pytest.approx(0.09)  # stage 1: 0.08 + its input transfer 0.01
    assert ppll_fill(c) == pytest.approx(0.15)
    assert e2e_step(c) == pytest.approx(0.02 + 0.03 + 0.04 + 0.05 + 0.003)
    # stage 0: 0.005 + 0.01 + gradient in 0.003; stage 1: 0.01 + 0.012 + activation in 0.003
    assert pipeline_stage_times(c, 4) == pytest.approx([0.018, 0.025])
    assert pipeline_step(c, 4) == pytest.approx(0.043 + 3 * 0.025 + 0.002)
    pred = predict(c, [4])
    assert pred["ppll"] == pytest.approx(64 / 0.09) and pred["gpipe M=4"] == pred["1f1b M=4"]
    assert pred["gpipe M=4"] == pytest.approx(64 / 0.12)


@pytest.mark.parametrize("k,m,speedup", [(2, 4, 1.60), (2, 8, 1.78), (4, 4, 2.29), (4, 8, 2.91), (4, 16, 3.37)])
def test_balanced_pipeline_reproduces_the_bubble_formula(k: int, m: int, speedup: float) -> None:
    """Balanced stages, free transfers and optimizer: step (M+K−1)·T, speed-up K·M/(M+K−1), as in
    (docs/pipeline.md, "The simulator")."""
    t = 0.01
    free = {1: [0.0] * (k - 1), m: [0.0] * (k - 1)}
    c = StageCosts(8, [t] * k, {1: [m * t] * k, m: [t / 2] * k}, {1: [0.0] * k, m: [t / 2] * k}, [0.0] * k, free)
    assert pipeline_step(c, m) == pytest.approx((m + k - 1) * t)
    assert e2e_step(c) / pipeline_step(c, m) == pytest.approx(speedup, abs=0.005)
    assert sequential_step(c) / ppll_step(c) == pytest.approx(k)  # PPLL on balanced stages: the ideal K×


def test_default_micro_batches_divide_the_batch() -> None:
    assert default_micro(2, 64) == [2, 4, 8]
    assert default_micro(4, 96) == [4, 8, 16]
    assert default_micro(3, 64) == []


def test_bench_pipeline_refuses_bad_settings(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    common = ["bench", "pipeline", "-c", DEMO, "--out", str(tmp_path / "b")]
    over = tiny_overrides(synthetic_root, tmp_path)
    assert main([*common, *over, "method.name=e2e"]) == 2
    assert "needs a local method" in capsys.readouterr().err
    assert main([*common, "--micro", "3", *over, "method.name=dgl"]) == 2
    assert "[3] do not divide" in capsys.readouterr().err
    assert main([*common, "--micro", "2,x", *over]) == 2
    assert main([*common, "--rows", "ppll,pipedream", *over, "method.name=dgl"]) == 2
    assert "--rows pipedream: unknown row kind" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_bench_pipeline_times_only_the_rows_asked_for(synthetic_root: Path, tmp_path: Path) -> None:
    """``--rows solo,ppll,independent``: many quick rounds of the goal's ratio, with no one-process group. Every
    round times each row once, and the ratios name only rows that ran."""
    out = tmp_path / "bench"
    args = ["bench", "pipeline", "-c", DEMO, "--k", "2", "--steps", "2", "--warmup", "1", "--repeats", "2"]
    args += ["--rows", "solo,ppll,independent", "--timeout", "200", "--out", str(out)]
    over = tiny_overrides(synthetic_root, tmp_path) + ["model.width=4", "method.name=dgl", "run.device=cpu"]
    over += ["ppll.labels=send", "ppll.pin_cores=true"]  # targets travel with the activations; ranks bound
    assert main([*args, *over]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["kind"] for r in results["rows"]] == ["solo", "ppll", "independent"]
    assert all(len(r["rounds"]) == 2 for r in results["rows"])
    assert set(results["headline"]) == {
        "ppll / sequential LL timed in the same window",
        "2 independent sequential processes / sequential LL timed in the same window",
        "ppll / 2 independent sequential processes",
    }
    assert results["ratio_columns"] == ["sequential, in the 2-process window (1×1)"]
    md = (out / "results.md").read_text()
    assert "ppll / sequential LL timed in the same window" in md and "PPLL targets sent by stage 0" in md
    ppll_cores = results["rows"][1]["rounds"][0]["cores"]  # ppll.pin_cores: a core of its own per rank
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(ppll_cores) == 2 and len(ppll_cores[0]) == len(ppll_cores[1]) == 1 and ppll_cores[0] != ppll_cores[1]
    assert results["rows"][0]["rounds"][0]["cores"][0] == ppll_cores[0]  # solo's rank 0 is bound like PPLL's


def test_pin_cores_gives_each_slot_its_own_cores() -> None:
    """In a child process (pinning this one would bind the test run): slot s of n gets core s of the cores it
    started with; more slots × threads than cores leaves the binding alone."""
    code = (
        "import os; from locallearn.parallel.launch import pin_cores; cores = sorted(os.sched_getaffinity(0)); "
        "n = len(cores); assert pin_cores(0, n + 1, 1) is None and sorted(os.sched_getaffinity(0)) == cores; "
        "assert pin_cores(0, 1, n + 1) is None; got = pin_cores(n - 1, n, 1); "
        "assert got == [cores[-1]] == sorted(os.sched_getaffinity(0)), got; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.timeout(300)
def test_bench_pipeline_writes_every_row(synthetic_root: Path, tmp_path: Path) -> None:
    """A tiny K=2 run with the simulation: one row per configuration, all on the same split and batch, measured
    throughput, busy fractions for the pipelines, predictions beside the measured rows, ratios and the table. The
    split is time-balanced: its E2E rows (K=1) must not ask for a time measurement (they once did, and crashed)."""
    out = tmp_path / "bench"
    args = ["bench", "pipeline", "-c", DEMO, "--k", "2", "--steps", "2", "--warmup", "1", "--repeats", "1"]
    args += ["--micro", "2", "--simulate", "2", "--timeout", "200", "--out", str(out)]
    over = tiny_overrides(synthetic_root, tmp_path) + ["model.width=4", "method.name=dgl", "run.device=cpu"]
    assert main([*args, *over, "split.balance=time"]) == 0
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["rows"]]
    assert labels == [
        "e2e (1×1)",
        "sequential (1×1)",
        "e2e (1×2)",
        "sequential (1×2)",
        "sequential, in the 2-process window (1×1)",
        "ppll (2×1)",
        "ppll stages alone, no messages (2×1)",
        "independent (2×1)",
        "gpipe M=2 (2×1)",
        "1f1b M=2 (2×1)",
        "ddp (2×1)",
    ]
    ends = results["module_ends"]
    assert len(ends) == 2 and results["batch_size"] == 64
    for row in results["rows"]:
        assert row["samples_per_s"] > 0 and row["fill_s"] > 0 and len(row["rounds"]) == 1
        assert row["module_ends"] == (ends if row["kind"] not in ("e2e", "ddp") else [ends[-1]])
        multi_rank_predicted = row["kind"] in ("ddp", "independent", "stages")
        busy = row["busy_fraction"]
        if row["kind"] in ("ppll", "gpipe", "1f1b", "stages"):
            assert len(busy) == 2 and all(0 < b <= 1 for b in busy), row["label"]
        else:
            assert all(b is None for b in busy)
        assert (row["predicted_samples_per_s"] is not None) == (row["threads"] == 1 and not multi_rank_predicted)
    sim = results["simulation"]["2"]
    assert len(sim["costs"]["ll"]) == 2 and len(sim["costs"]["comm"]["1"]) == 1 and sim["costs"]["comm"]["1"][0] > 0
    ppll = next(r for r in results["rows"] if r["kind"] == "ppll")
    solo = next(r for r in results["rows"] if r["kind"] == "solo")  # rank 0 computed, rank 1 waited
    assert len(solo["rounds"][0]["idle_ranks_cpu_s"]) == 1 and solo["rounds"][0]["idle_ranks_cpu_s"][0] >= 0
    assert results["headline"]["ppll / sequential LL timed in the same window"] == pytest.approx(
        ppll["samples_per_s"] / solo["samples_per_s"]
    )
    assert ppll["ratios"]["sequential (1×1)"] == pytest.approx(
        ppll["samples_per_s"] / results["rows"][1]["samples_per_s"]
    )
    assert any(name.startswith("ppll / best of GPipe and 1F1B") for name in results["headline"])
    ceiling = next(r for r in results["rows"] if r["kind"] == "independent")  # 2 batches per step, no messages
    assert results["headline"]["ppll / 2 independent sequential processes"] == pytest.approx(
        statistics.median(p["samples_per_s"] / c["samples_per_s"] for p, c in zip(ppll["rounds"], ceiling["rounds"]))
    )
    alone = next(r for r in results["rows"] if r["kind"] == "stages")  # the slowest stage sets the pace
    assert max(alone["busy_fraction"]) == 1.0 and len(alone["rounds"][0]["rank_step_ms"]) == 2
    assert results["headline"]["ppll / its stages alone, no messages (what the messages cost)"] == pytest.approx(
        ppll["samples_per_s"] / alone["samples_per_s"]
    )
    md = (out / "results.md").read_text()
    assert "ppll (2×1)" in md and "Predicted samples/s at K=2" in md and "predicted / measured" in md
    assert results["machine"]["torch"] == torch.__version__ and "git" in results["machine"]


@pytest.mark.parametrize("channels_last", [True, False])
def test_pipeline_stage_sends_contiguous_tensors_both_ways(channels_last: bool) -> None:
    """gloo refuses non-contiguous receive buffers, which the pipeline stages allocate with the sender's strides:
    the activation a stage sends downstream and the input gradient it sends upstream must both be contiguous (a
    channels_last input gradient crashed GPipe on ResNet-32 split [8, 17])."""
    from locallearn.parallel.pipeline_baselines import _GlooSafe

    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    stage = _GlooSafe(conv, channels_last)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    out = stage(x)
    (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert out.is_contiguous() and grad.is_contiguous()
    (reference,) = torch.autograd.grad(conv(x), x, torch.ones_like(out))
    (ones,) = torch.autograd.grad(stage(x), x, torch.ones_like(out))
    torch.testing.assert_close(ones, reference)  # the wrapper changes layouts, not values


@pytest.mark.timeout(300)
def test_bench_pipeline_simulates_time_balanced_splits_per_k(synthetic_root: Path, tmp_path: Path) -> None:
    """``split.balance=time`` is measured (not refused) and re-split for every simulated K, and each simulation
    records the split its stages were timed on."""
    out = tmp_path / "bench"
    args = ["bench", "pipeline", "-c", DEMO, "--k", "2", "--simulate", "3", "--simulate-only", "--micro", "2"]
    over = ["model.width=4", "method.name=dgl", "split.balance=time", "run.device=cpu"]
    assert main([*args, "--out", str(out), *tiny_overrides(synthetic_root, tmp_path), *over]) == 0
    sim = json.loads((out / "results.json").read_text())["simulation"]
    assert sorted(sim) == ["2", "3"]
    for k, record in sim.items():
        ends = record["costs"]["ends"]
        assert len(ends) == int(k) == len(record["costs"]["ll"]) and ends == sorted(ends)
    assert "stages ending at units" in (out / "results.md").read_text()


def test_median_interval_matches_the_binomial_tables() -> None:
    """95 % distribution-free intervals of the median: ranks (10, 21) for n = 30 and (2, 8) for n = 9 (standard
    tables); [min, max] covers 1 - 2/2^6 ≈ 0.969 at n = 6, only 0.9375 at n = 5, so n = 5 has no interval."""
    from locallearn.bench.pipeline import median_interval

    values = [float(v) for v in range(30, 0, -1)]  # unsorted on purpose
    assert median_interval(values) == (10.0, 21.0)
    assert median_interval([float(v) for v in range(1, 10)]) == (2.0, 8.0)
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
