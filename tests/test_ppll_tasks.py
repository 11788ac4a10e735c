"""PPLL beyond classification: super-resolution and detection train bitwise like the sequential engine and log its
evaluation keys (``test_psnr``, ``test_map``, ``aux_<headline>``); what PPLL cannot run is one ConfigError before
any rank waits on another; ``locallearn eval RUN_DIR`` scores a PPLL run from its stage checkpoints."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest

from locallearn.cli.commands import evaluate_run
from locallearn.cli.main import main
from locallearn.parallel.ppll import spawn_ppll
from locallearn.train import fit, load_checkpoint, load_config
from locallearn.train.checkpoint import save_checkpoint
from locallearn.train.config import ConfigError
from locallearn.train.rundir import read_records

from .test_ppll import assert_stages_match, ppll_base

pytestmark = pytest.mark.timeout(300)
SPAWN_TIMEOUT = 240.0  # seconds before spawn_ppll kills every rank: a hang fails the test
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SR_CONFIG = CONFIGS / "sr" / "edsr_x2_glcan_k2.yaml"
DETECTION_CONFIG = CONFIGS / "detection" / "shapes_fcos_dgl_k2.yaml"
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")


def sr_base(out: Path, method: str) -> list[str]:
    """Tiny EDSR (4 blocks, width 8), K=2, on scikit-image's photographs: one epoch of 7 images × 2 patches of 16
    HR pixels in batches of 4 (4 steps, the last one ragged), evaluated on one test photograph."""
    return [
        f"method.name={method}",
        "split.k=2",
        "model.name=edsr4",
        "model.width=8",
        "data.patch_size=16",
        "data.repeat=2",
        "data.batch_size=4",
        "data.limit_test=1",
        "run.epochs=1",
        "run.threads=1",
        "run.device=cpu",
        f"run.out={out}",
        "run.progress=false",
    ]


def detection_base(out: Path, ends: list[int]) -> list[str]:
    """FCOS on ResNet-18 of width 8, DGL split at ``ends``: 2 steps of 8 rendered shapes images, 8 test images."""
    return [
        "model.width=8",
        "split.preset=ends",
        f"split.ends=[{','.join(map(str, ends))}]",
        "data.limit_train=16",
        "data.limit_test=8",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "run.epochs=1",
        "run.threads=1",
        "run.device=cpu",
        f"run.out={out}",
        "run.progress=false",
    ]


def evaluation_keys(result: dict[str, Any]) -> set[str]:
    return {key for key in result if key.startswith(("test_", "aux_"))}


def assert_same_evaluation(pipelined: dict[str, Any], sequential: dict[str, Any]) -> None:
    """PPLL logs exactly the sequential engine's evaluation keys, with the same values (also in metrics.jsonl)."""
    assert evaluation_keys(pipelined) == evaluation_keys(sequential), (pipelined, sequential)
    for key in evaluation_keys(sequential):
        assert pipelined[key] == pytest.approx(sequential[key], abs=1e-6), key
    logged = read_records(Path(pipelined["run_dir"]) / "metrics.jsonl")[-1]
    assert evaluation_keys(logged) == evaluation_keys(sequential)


def run_both(
    config: Path | None, base: list[str], k: int, ppll: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sequential engine's result and a PPLL run's (K processes, plus ``ppll`` overrides) on the same config."""
    sequential = fit(load_config(config, base), quiet=True)
    over = base + ["parallel=ppll", f"ppll.procs={k}", *(ppll or [])]
    pipelined = spawn_ppll(load_config(config, over), timeout=SPAWN_TIMEOUT)
    return sequential, pipelined


@needs_skimage
@pytest.mark.parametrize("method,extra", [("dgl", []), ("glcan", ["method.glcan_global=per_module"])])
def test_sr_ppll_equals_sequential_bitwise(tmp_path: Path, method: str, extra: list[str]) -> None:
    sequential, pipelined = run_both(SR_CONFIG, sr_base(tmp_path, method) + extra, 2)
    reference = load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt")
    assert pipelined["step"] == reference["step"] == 4
    assert_stages_match(reference, pipelined["run_dir"], 2)
    assert {"test_psnr", "test_ssim", "test_loss", "aux_psnr"} <= set(pipelined)
    assert_same_evaluation(pipelined, sequential)


@needs_skimage
def test_sr_ppll_refuses_glcan_shared_ema_head(tmp_path: Path) -> None:
    """Raised by every rank before any message, it reaches the caller as one line naming the fix."""
    base = sr_base(tmp_path, "glcan") + ["method.glcan_global=ema", "parallel=ppll", "ppll.procs=2"]
    with pytest.raises(ConfigError, match="use method.glcan_global=per_module") as e:
        spawn_ppll(load_config(SR_CONFIG, base), timeout=SPAWN_TIMEOUT)
    assert "\n" not in str(e.value)


def test_detection_ppll_refuses_a_tap_that_crosses_stages(tmp_path: Path) -> None:
    """Units 0..4 in stage 0 put the C3 tap (unit 4) away from the FPN head: refused, not hung."""
    base = detection_base(tmp_path, [5, 10]) + ["parallel=ppll", "ppll.procs=2"]
    with pytest.raises(ConfigError, match=r"cannot split this backbone at \[5, 10\].*C3") as e:
        spawn_ppll(load_config(DETECTION_CONFIG, base), timeout=SPAWN_TIMEOUT)
    assert "\n" not in str(e.value)


def test_detection_ppll_runs_with_every_tap_in_the_head_stage(tmp_path: Path) -> None:
    """Split before layer2 (both taps and the head in stage 1): bitwise the sequential engine, and test_map and
    aux_map are logged. The boxes travel with the activations (``ppll.labels=send``: stage 1 reads no data, yet its
    mAP clips boxes to the true image size), and ``locallearn eval`` of the run directory gives the logged mAP."""
    sequential, pipelined = run_both(DETECTION_CONFIG, detection_base(tmp_path, [3, 10]), 2, ["ppll.labels=send"])
    assert_stages_match(load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt"), pipelined["run_dir"], 2)
    assert 0 <= pipelined["test_map"] <= 1 and len(pipelined["aux_map"]) == 1
    assert_same_evaluation(pipelined, sequential)
    assert evaluate_run(pipelined["run_dir"], [])["test_map"] == pytest.approx(pipelined["test_map"], abs=1e-6)


def test_eval_of_a_ppll_run_dir(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    """``locallearn eval RUN_DIR`` assembles the stage checkpoints into one process and reports what the run
    logged; a missing stage or stages at different steps is one line."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2) + ["parallel=ppll", "ppll.procs=2"]
    run = spawn_ppll(load_config(None, base), timeout=SPAWN_TIMEOUT)
    assert evaluate_run(run["run_dir"], [])["test_acc"] == run["test_acc"]
    capsys.readouterr()
    assert main(["eval", run["run_dir"]]) == 0
    assert f"test_acc {run['test_acc']:.4f}" in capsys.readouterr().out

    missing = shutil.copytree(run["run_dir"], tmp_path / "missing")
    (missing / "ckpt_stage1.pt").unlink()
    skewed = shutil.copytree(run["run_dir"], tmp_path / "skewed")
    state = load_checkpoint(skewed / "ckpt_stage1.pt")
    save_checkpoint({**state, "step": state["step"] - 1}, skewed / "ckpt_stage1.pt")
    for run_dir, fragment in ((missing, "needs ckpt_stage0..1.pt, found stages [0]"), (skewed, "different steps")):
        assert main(["eval", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
