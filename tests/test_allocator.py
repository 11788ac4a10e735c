"""``tune_cpu_allocator``: applied once on Linux/glibc, recorded in env.json, inherited by spawned processes."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_tuning_applies_mallopt_and_children_inherit_it(tmp_path: Path) -> None:
    """A fresh interpreter: nothing is tuned until asked; then mallopt is applied, and a child process started from it
    reports the inherited setting."""
    code = (
        "import json, subprocess, sys\n"
        "from locallearn.train import allocator_setting, tune_cpu_allocator\n"
        "before = allocator_setting()\n"
        "after = tune_cpu_allocator()\n"
        "child = subprocess.run([sys.executable, '-c', 'from locallearn.train import allocator_setting;"
        " import json; print(json.dumps(allocator_setting()))'], capture_output=True, text=True, check=True)\n"
        "print(json.dumps([before, after, json.loads(child.stdout)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PATH": ""})
    before, after, child = json.loads(out.stdout)
    kept = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"LOCALLEARN_CPU_ALLOCATOR": "glibc"},
    )
    _, opted_out, child_of_opted_out = json.loads(kept.stdout)
    assert not opted_out["applied"] and "glibc's defaults kept" in opted_out["reason"]
    assert not child_of_opted_out["applied"]
    assert before == {"applied": False, "reason": "not requested"}
    assert after["applied"] and after["mmap_threshold"] == 32 * 2**20 and after["trim_threshold"] == 2**30
    assert child["applied"] and child["mmap_threshold"] == 32 * 2**20 and "inherited" in child["reason"]


def test_env_json_records_the_allocator(synthetic_root: Path, tmp_path: Path) -> None:
    from locallearn.cli.main import main

    from .conftest import tiny_overrides

    assert (
        main(
            [
                "train",
                "-c",
                "configs/smoke/fmnist_dgl_k3.yaml",
                *tiny_overrides(synthetic_root, tmp_path),
                "run.max_steps=1",
            ]
        )
        == 0
    )
    env = json.loads(next(tmp_path.glob("*/env.json")).read_text())
    assert env["cpu_allocator"]["applied"] is GLIBC
