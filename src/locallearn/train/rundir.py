"""What a run writes and prints: its directory (``config.yaml``, ``env.json``, ``metrics.jsonl`` with one JSON
object per epoch and per step record, the source of truth for plots; the checkpoints) and its console lines
(docs/configuration.md, "What a run writes")."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .allocator import allocator_setting
from .config import ConfigError


def make_dir(path: str | Path, what: str = "run.out") -> Path:
    """``path`` as a folder that exists and is writable, or one ConfigError naming ``what`` (the key or option
    that gave it), the path and the way out; called before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={path} is an existing file, not a folder; choose another {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{what}={path}: cannot create the folder ({e.strerror}); choose another {what}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}={path} is not writable; choose a folder you can write to")
    return path


def new_run_dir(out: str, name: str) -> Path:
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    base = make_dir(out) / f"{stamp}_{name}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}_{i}"), i + 1
    path.mkdir(parents=True)
    return path


def latest_run_dir(out: str | Path, name: str) -> Path | None:
    """The newest folder ``<date>_<time>_<name>`` (or ``..._<name>_<n>``, see :func:`new_run_dir`) of ``out`` that
    holds a checkpoint (``ckpt_last.pt``, or a PPLL run's ``ckpt_stage0.pt``): the run to continue, or None."""
    pattern = re.compile(r"\d{4}-\d\d-\d\d_\d{6}_" + re.escape(name) + r"(_\d+)?")
    found = [
        p
        for p in Path(out).glob(f"*{name}*")
        if pattern.fullmatch(p.name) and ((p / "ckpt_last.pt").exists() or (p / "ckpt_stage0.pt").exists())
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a result: machine, threads, device name, torch version, git commit, command line."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": load,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "git": git_commit(),
        "hostname": socket.gethostname(),
        "argv": sys.argv,
        "cpu_allocator": allocator_setting(),
    }


def train_throughput(records: list[dict[str, Any]]) -> float:
    """Training images/s over a run's epoch records (evaluation excluded): images over seconds, summed."""
    seconds = sum(r["epoch_time_s"] for r in records)
    images = sum(r["imgs_per_s"] * r["epoch_time_s"] for r in records)
    return images / max(seconds, 1e-9)


def training_seconds(records: list[dict[str, Any]], batch_size: int) -> float:
    """Training seconds of a run's steps (evaluation excluded): each record's samples at the speed measured for it.

    This is the sum of ``epoch_time_s`` for records that cover all of their steps. A record written before
    checkpoints kept the time of unrecorded steps (an epoch continued after an interruption timed only its
    resumed part) is counted at its measured speed for all of its steps, instead of dropping the time trained
    before the interruption."""
    seconds, last = 0.0, 0
    for r in records:
        n = r.get("train_size")
        if not n or not r.get("imgs_per_s"):  # records from before train_size was kept: their own time
            seconds, last = seconds + r["epoch_time_s"], r["step"]
            continue
        per_epoch = math.ceil(n / batch_size)
        short = per_epoch * batch_size - n  # the epoch's last batch is this much smaller
        samples = (r["step"] - last) * batch_size - (r["step"] // per_epoch - last // per_epoch) * short
        seconds += samples / r["imgs_per_s"]
        last = r["step"]
    return seconds


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics record, as TensorBoard tags: numbers under their key, lists one tag per module
    (``train_loss/module_0``, ``aux_acc/module_2``; a None entry, a module without that head, is left out); a
    step record's tags start with ``step/``."""
    scalars: dict[str, float] = {}
    prefix = "step/" if record.get("kind") == "step" else ""
    for key, value in record.items():
        if key in ("epoch", "step", "kind"):
            continue
        key = prefix + key
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
            scalars[key] = float(value)
        elif isinstance(value, list):
            scalars |= {f"{key}/module_{i}": float(v) for i, v in enumerate(value) if isinstance(v, (int, float))}
    return scalars


def check_tensorboard(enabled: bool) -> None:
    """``log.tensorboard=true`` without TensorBoard installed fails before any work starts."""
    if enabled:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "log.tensorboard=true needs TensorBoard: pip install 'locallearn[tb]' (or set log.tensorboard=false)"
            ) from None


class MetricsLog:
    """Append-only JSONL: each line survives a crash, and ``plot``/pandas read the file directly.

    With ``tensorboard``, every record is also written as scalars (:func:`tensorboard_scalars`) at its global
    ``step`` to ``<run>/tb/`` by ``torch.utils.tensorboard``; the multi-process runtimes log from rank 0, which
    has gathered every stage's figures, so one event stream holds the whole run."""

    def __init__(self, path: Path, tensorboard: bool = False) -> None:
        self.path = path
        self.writer = None
        if tensorboard:
            check_tensorboard(True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(path.parent / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for tag, value in tensorboard_scalars(record).items():
                self.writer.add_scalar(tag, value, global_step=record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def read(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The epoch records (``kind`` None), or the records of one ``kind`` (``step``)."""
        return read_records(self.path, kind)


def read_records(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """One kind of record of a ``metrics.jsonl``: epoch records (no ``kind`` key) by default, or ``step`` records."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == kind]


def format_row(r: dict[str, Any], metric: str = "acc") -> str:
    """One console line per record; ``metric`` is the task's headline (``acc``, ``psnr``)."""
    losses = " ".join(f"{v:.3f}" for v in r["train_loss"])
    test = f"  test_{metric} {r[f'test_{metric}']:.4f}" if f"test_{metric}" in r else ""
    aux = ""
    if any(a is not None for a in r.get(f"aux_{metric}", [])):
        aux = f"  aux_{metric} " + " ".join("-" if a is None else f"{a:.3f}" for a in r[f"aux_{metric}"])
    train = r[f"train_{metric}"]  # NaN where the task has no per-batch training metric (detection mAP)
    train = "" if math.isnan(train) else f"  train_{metric} {train:.4f}"
    return (
        f"epoch {r['epoch']:3d}  step {r['step']:6d}  lr {r['lr']:.4f}  loss [{losses}]"
        f"{train}{test}{aux}  {r['imgs_per_s']:.0f} img/s  {r['epoch_time_s']:.1f}s"
    )


def format_step(r: dict[str, Any], metric: str = "acc") -> str:
    """One console line per step record (runs without a progress bar: logs under nohup or a batch system)."""
    losses = " ".join(f"{v:.3f}" for v in r["train_loss"])
    train = r[f"train_{metric}"]
    train = "" if math.isnan(train) else f"  train_{metric} {train:.4f}"
    return (
        f"  step {r['step']:6d}  epoch {r['epoch']:3d}  lr {r['lr']:.4f}  loss [{losses}]{train}  "
        f"{r['imgs_per_s']:.0f} img/s"
    )
