"""Activation memory, measured the same way on every device (engineering.md §8).

:class:`SavedTensorMeter` installs autograd saved-tensor hooks: every tensor autograd keeps for backward is
counted by the bytes of its storage, each storage once. Parameters and their views (``weight.t()``) are
not activations and are skipped. The
engine calls :meth:`release` after each local backward (that module's graph is freed), so ``peak`` is the
largest amount of saved activations alive at once during a step: E2E keeps everything until its single
backward, a local method only one module's worth. Deterministic, so tests can assert on it.
"""

from __future__ import annotations

import torch


class SavedTensorMeter:
    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._seen: set[tuple[int, int]] = set()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if not (base.is_leaf and base.requires_grad):  # parameters (and views like weight.t()) are not activations
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in self._seen:
                self._seen.add(key)
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
        return t

    def release(self) -> None:
        """A local backward freed its graph: forget what it saved."""
        self.current = 0
        self._seen.clear()

    def reset(self) -> None:
        self.release()
        self.peak = 0

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


def cuda_peak_bytes(device: torch.device) -> int | None:
    """``max_memory_allocated`` since the last reset on a CUDA device, else None."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
