"""Checkpoints are plain dicts of tensors and Python primitives: written atomically (temp file + ``os.replace``,
so a crash never leaves a half-written ``ckpt_last.pt``) and loaded with ``weights_only=True``, so a checkpoint can
never run code (docs/configuration.md, "What a run writes")."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

CKPT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    save_tensors({"version": CKPT_VERSION, **state}, path)


def save_tensors(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file moved into place, so ``path`` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass a run directory or its ckpt_last.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
        # (torch's own message advises weights_only=False, which would run code from the file: never)
        raise ValueError(
            f"{path}: not a locallearn checkpoint (not a torch file of plain tensors, or cut short); pass a run "
            "directory or its ckpt_last.pt"
        ) from None
    if not isinstance(state, dict) or state.get("version") != CKPT_VERSION:
        raise ValueError(f"{path}: not a locallearn checkpoint (version {CKPT_VERSION} expected)")
    return state
