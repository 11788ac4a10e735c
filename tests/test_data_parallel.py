"""Data-parallel local learning (``parallel=dp``) and PPLL stages replicated on a 2-D mesh (``ppll.replicas``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.cli.main import main
from locallearn.parallel.data_parallel import fit_dp
from locallearn.parallel.ppll import spawn_ppll
from locallearn.train import fit, load_checkpoint, load_config
from locallearn.train.rundir import read_records

from .conftest import tiny_overrides
from .test_ppll import assert_resumed_records_match, assert_stages_match, exit_at_call, ppll_base, run_until_exit

pytestmark = pytest.mark.timeout(240)

# BatchNorm-free: a ViT (LayerNorm) with DGL's token heads (LayerNorm, CLS, Linear) and CE, a per-sample mean loss.
NO_BN = ["model.name=vit_tiny", "model.width=16", "optim.lr=0.2"]


def test_dp_matches_one_process_on_the_global_batch(synthetic_root: Path, tmp_path: Path) -> None:
    """2 ranks, each on half of every batch (the ragged last one too: 32 = 16 + 16), give the parameters of one
    process on the whole batch up to the all-reduce's summation order."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 3) + NO_BN
    sequential = fit(load_config(None, base), quiet=True)
    replicated = fit_dp(load_config(None, base + ["parallel=dp", "ppll.procs=2"]))
    ref = load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt")
    got = load_checkpoint(Path(replicated["run_dir"]) / "ckpt_last.pt")
    assert got["step"] == ref["step"] == 10 and got["config"]["parallel"] == "dp"
    for part in ("model", "aux"):
        for name, value in ref[part].items():
            torch.testing.assert_close(got[part][name], value, rtol=0, atol=1e-6, msg=f"{part} {name}")
    assert replicated["test_acc"] == pytest.approx(sequential["test_acc"], abs=1e-6)


@pytest.mark.parametrize("labels", ["loader", "send"])
def test_mesh_of_stages_and_replicas_matches_one_process(synthetic_root: Path, tmp_path: Path, labels: str) -> None:
    """K=2 stages × 2 replicas (4 gloo ranks, rank = replica·K + stage), with a cascade across the stage boundary
    and MAN's EMA shipping: each stage equals one process on the global batch (1e-6). With ``ppll.labels=send``
    each replica's stage 1 gets its shard's labels and its share of the batch (ragged last batch: 16 of 32) from
    its stage 0."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2) + NO_BN + ["method.addons=[cascade,man]"]
    sequential = fit(load_config(None, base), quiet=True)
    mesh_cfg = base + ["parallel=ppll", "ppll.procs=4", "ppll.replicas=2", f"ppll.labels={labels}"]
    mesh = spawn_ppll(load_config(None, mesh_cfg))
    assert_stages_match(load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt"), mesh["run_dir"], 2, 1e-6)
    assert mesh["test_acc"] == pytest.approx(sequential["test_acc"], abs=1e-6)


def test_dp_trains_a_resnet_and_resumes(synthetic_root: Path, tmp_path: Path) -> None:
    """ResNet-8 (BatchNorm: per-rank batch statistics, rank 0's buffers broadcast) on 2 ranks learns; ``locallearn
    train --resume`` continues the run with a longer schedule."""
    base = tiny_overrides(synthetic_root, tmp_path) + ["method.name=dgl", "split.k=2", "run.threads=1"]
    first = fit_dp(load_config(None, base + ["parallel=dp", "ppll.procs=2", "run.epochs=2"]))
    assert main(["train", "--resume", first["run_dir"], "run.epochs=3"]) == 0
    records = read_records(Path(first["run_dir"]) / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["train_loss"][-1] < records[0]["train_loss"][-1]
    assert records[-1]["test_acc"] > 0.2  # 10 classes: chance is 0.1


def _replicas_killed_at_step_6(rank: int, world: int, port: int, body, data: dict, out_dir: str, *rest) -> None:
    """Every rank trains five steps, then the job is killed (the last checkpoint was at step 3)."""
    from locallearn.parallel import launch
    from locallearn.train.engine import LocalEngine

    exit_at_call(LocalEngine, "train_step", 6, 9)
    launch._spawned(rank, world, port, body, data, out_dir, *rest)


def test_dp_killed_mid_epoch_records_the_whole_epoch_after_resume(synthetic_root: Path, tmp_path: Path) -> None:
    """Both ranks killed at step 5 of 8, resumed from the step-3 checkpoint: each epoch's record equals the
    uninterrupted run's (bitwise: every rank resumes with its own statistics) and covers all of its samples."""
    base = tiny_overrides(synthetic_root, tmp_path) + ["method.name=dgl", "split.k=2", "run.threads=1"]
    cfg = load_config(None, base + ["parallel=dp", "ppll.procs=2", "run.ckpt_every=3"])
    full = fit_dp(cfg)
    run_dir = tmp_path / "killed"  # the run's folder (as a resumed run's, chosen by the caller)
    run_dir.mkdir()
    assert run_until_exit(_replicas_killed_at_step_6, cfg, 2, run_dir) == [9, 9]
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_resumed_records_match(full["run_dir"], run_dir, [8, 16])


def _replica_that_dies(rank: int, world: int, port: int, body, data: dict, out_dir: str, resume: bool, queue) -> None:
    """Rank 1 trains two steps, then dies."""
    from locallearn.parallel import launch
    from locallearn.train.engine import LocalEngine

    if rank == 1:
        exit_at_call(LocalEngine, "train_step", 3, 3)
    launch._spawned(rank, world, port, body, data, out_dir, resume, queue)


def test_a_dead_replica_fails_the_others(synthetic_root: Path, tmp_path: Path, capfd) -> None:
    base = tiny_overrides(synthetic_root, tmp_path) + ["method.name=dgl", "split.k=2", "parallel=dp"]
    codes = run_until_exit(_replica_that_dies, load_config(None, base + ["ppll.timeout=30"]), 2, tmp_path)
    assert codes[1] == 3 and codes[0] not in (None, 0), codes
    err = capfd.readouterr().err
    assert "gradient all-reduce of module" in err and "data-parallel rank 1 died or hangs" in err, err[-3000:]
