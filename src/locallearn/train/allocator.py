"""CPU step times free of allocator churn: glibc's ``mallopt`` at start-up.

glibc serves large blocks with ``mmap`` and gives freed memory back to the OS (``munmap``, heap trimming). A
training step allocates and frees the same large activation blocks every step, so by default each step pays for
returning them and page-faulting them in again; on this project's 2-core CPU machine that was a third of
ResNet-110's E2E step time, which made local learning (smaller blocks) look faster than it is. Raising
``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 1 GiB keeps the blocks in the heap between steps, as
PyTorch's CUDA caching allocator does on GPUs. The ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
environment variables do the same for a process started with them. ``LOCALLEARN_CPU_ALLOCATOR=glibc`` in the
environment keeps glibc's defaults (to measure the difference; recorded as the reason in ``env.json``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # glibc's own upper bound for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**30
ENV_MMAP, ENV_TRIM = "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"
ENV_OPT_OUT = "LOCALLEARN_CPU_ALLOCATOR"

_APPLIED: dict[str, Any] = {"applied": False, "reason": "not requested"}


def tune_cpu_allocator() -> dict[str, Any]:
    """Apply the setting on Linux/glibc (once per process; later calls return the first result). Returns what was
    done: ``{"applied": True, "mmap_threshold": ..., "trim_threshold": ...}``, or ``applied: False`` with the
    reason (another OS or C library, or ``mallopt`` refused). Recorded in every run's ``env.json``."""
    if _APPLIED["reason"] != "not requested":
        return dict(_APPLIED)
    result: dict[str, Any] = {"applied": False}
    libc_name = ctypes.util.find_library("c") if platform.system() == "Linux" else None
    if os.environ.get(ENV_OPT_OUT) == "glibc":
        result["reason"] = f"{ENV_OPT_OUT}=glibc (glibc's defaults kept)"
    elif libc_name is None or platform.libc_ver()[0] != "glibc":
        result["reason"] = f"not Linux/glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    else:
        libc = ctypes.CDLL(libc_name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        result = (
            {"applied": True, "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
            if ok
            else {"applied": False, "reason": "mallopt refused"}
        )
    if result["applied"]:
        result["reason"] = "tune_cpu_allocator"
        # Processes started from this one (spawned ranks and workers, torchrun children) get the same setting
        # from glibc itself, which reads these at start-up.
        os.environ.setdefault(ENV_MMAP, str(MMAP_THRESHOLD))
        os.environ.setdefault(ENV_TRIM, str(TRIM_THRESHOLD))
    _APPLIED.clear()
    _APPLIED.update(result)
    return dict(_APPLIED)


def allocator_setting() -> dict[str, Any]:
    """What :func:`tune_cpu_allocator` did in this process, or the setting it inherited through glibc's
    environment variables (``reason: not requested`` if neither)."""
    if not _APPLIED["applied"] and ENV_MMAP in os.environ and platform.libc_ver()[0] == "glibc":
        return {
            "applied": True,
            "mmap_threshold": int(os.environ[ENV_MMAP]),
            "trim_threshold": int(os.environ.get(ENV_TRIM, -1)),
            "reason": f"inherited {ENV_MMAP} / {ENV_TRIM}",
        }
    return dict(_APPLIED)
