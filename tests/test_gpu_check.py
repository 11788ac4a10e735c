"""``scripts/gpu_check.sh --dry``: the prepared GPU check runs every step at toy sizes on the CPU and checks its
own outputs (so the script a lent GPU will run is known to work before the GPU is there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_writes_every_output(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--dry"],
        capture_output=True,
        text=True,
        env=env,
        timeout=280,
    )
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


def test_gpu_check_without_cuda_and_without_dry_says_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and "run with --dry" in done.stderr
