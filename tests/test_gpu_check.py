"""``scripts/gpu_check.sh --dry``: the prepared GPU check runs every step at toy sizes on the CPU and checks its
own outputs (so the script a lent GPU will run is known to work before the GPU is there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    """``bash scripts/NAME ARGS`` with this interpreter as PYTHON and one thread per process."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / name), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_gpu_check_dry_mode_writes_every_output(tmp_path: Path) -> None:
    done = run_script("gpu_check.sh", str(tmp_path / "out"), "--dry")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "self-check passed" in done.stdout
    memory = json.loads((tmp_path / "out" / "memory" / "results.json").read_text())
    assert {(r["label"], r["k"]) for r in memory["rows"]} == {
        ("e2e", 1),
        ("infopro", 2),
        ("infopro", 3),
        ("infopro", 4),
        ("dgl", 8),
    }
    assert json.loads((tmp_path / "out" / "loader.json").read_text())["rows"][0]["images_per_s"] > 0


def test_the_gpu_scripts_without_cuda_and_without_dry_say_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    for script in ("gpu_check.sh", "gpu_study.sh"):
        done = run_script(script, str(tmp_path), timeout=60)
        assert done.returncode == 2 and "run with --dry" in done.stderr, script


def test_gpu_study_dry_mode_trains_both_phases_and_packs_what_the_device_returns(tmp_path: Path) -> None:
    """``scripts/gpu_study.sh --dry``: K=8 then K=16 at toy sizes, each finished run in its phase's results.json,
    and OUT within what the device tool sends back (at most 8 files, at most 2 folders down)."""
    out = tmp_path / "out"
    done = run_script("gpu_study.sh", str(out), "--dry")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "self-check passed" in done.stdout
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "env.txt",
        "k16/results.json",
        "k16/results.md",
        "k8/results.json",
        "k8/results.md",
        "runs.tar.gz",
        "study.log",
    ]
    k16 = json.loads((out / "k16" / "results.json").read_text())
    assert {(r["label"], r["k"]) for r in k16["runs"]} == {("dgl", 16), ("dgl+mlaan", 16)}
