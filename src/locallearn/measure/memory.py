"""Training memory: activations measured the same way on every device, plus the parts a method cannot change
(parameters, gradients, optimizer state), CUDA peaks above a baseline and the process's peak RSS as a coarse
cross-check (docs/benchmarks.md, "Which memory figure is which").

:class:`SavedTensorMeter` installs autograd saved-tensor hooks: every tensor autograd keeps for backward is
counted by the bytes of its storage, each storage once. Parameters and their views (``weight.t()``) are
not activations and are skipped. The
engine calls :meth:`release` after each local backward (that module's graph is freed), so ``peak`` is the
largest amount of saved activations alive at once during a step: E2E keeps everything until its single
backward, a local method only one module's worth. Deterministic, so tests can assert on it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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
            # The storage's identity (its StorageImpl), not its address: meta and fake tensors, which the
            # estimator runs on, all have address 0.
            key = (storage._cdata, storage.nbytes())
            if key not in self._seen:
                self._seen.add(key)
                # A storage that dies frees its identity for a new one (a branch of the graph dropped early):
                # forget it then, so the newcomer is counted.
                weakref.finalize(storage, self._seen.discard, key)
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
        # Hand autograd a detached alias, not ``t``: an output saved by its own node (exp, relu) would otherwise
        # hold that node through the tensor, a cycle no collector sees, and a graph kept by ``retain_graph=True``
        # (a cascade) would never be freed. Same storage and version counter, so nothing else changes.
        return t.detach()

    def release(self, keep: int = 0) -> None:
        """A local backward freed its graph: forget what it saved. ``keep`` bytes stay counted (graphs a
        cascade still holds); their storages are not re-counted if saved again."""
        self.current = keep
        if not keep:
            self._seen.clear()

    def reset(self) -> None:
        self.release()
        self.peak = 0

    def __enter__(self) -> SavedTensorMeter:
        # Under torch.compile the hook is not traced: it mutates Python state (the set, a weakref.finalize per
        # storage) that dynamo would otherwise guard on, and the guard fails on the frame that made it. Run
        # eagerly, it sees the tensors the compiled graph saves for its backward, as it sees an eager graph's.
        self._hooks = torch.autograd.graph.saved_tensors_hooks(torch.compiler.disable(self._pack), lambda t: t)
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


def cuda_reserved_peak_bytes(device: torch.device) -> int | None:
    """``max_memory_reserved`` since the last reset on a CUDA device (what the caching allocator held), else None."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_reserved(device))


class CudaPeak:
    """CUDA peak memory of a phase, *above the baseline at its start*.

    The resident loader keeps the whole dataset on the GPU; an absolute peak would dilute the BP-vs-local ratio
    by that constant. Enter the context after the data (and the model) are resident: the baseline is what is
    allocated then, and ``allocated``/``reserved`` are the phase's peaks minus it. On a non-CUDA device every
    figure stays None, so callers need no branches.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.baseline_allocated: int | None = None
        self.baseline_reserved: int | None = None
        self.allocated: int | None = None
        self.reserved: int | None = None

    def __enter__(self) -> CudaPeak:
        if self.device.type == "cuda":
            reset_cuda_peak(self.device)
            self.baseline_allocated = int(torch.cuda.memory_allocated(self.device))
            self.baseline_reserved = int(torch.cuda.memory_reserved(self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated = int(torch.cuda.max_memory_allocated(self.device)) - (self.baseline_allocated or 0)
            self.reserved = int(torch.cuda.max_memory_reserved(self.device)) - (self.baseline_reserved or 0)


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the duration (C++ log lines that Python cannot filter)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class AllocatorPeak:
    """The allocator-level peak of a phase above what was allocated at its start: every tensor, temporaries and
    gradients included, not only what autograd saves.

    CUDA: ``max_memory_allocated`` after a reset, minus ``memory_allocated`` at the start (:class:`CudaPeak`).
    CPU: PyTorch's profiler with ``profile_memory=True`` records every allocation and free of the CPU allocator;
    ``peak`` is the largest running sum of those events, in time order. Profiling slows the phase, so measure
    memory and time in separate steps.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak: int | None = None
        self._cuda = CudaPeak(self.device)
        self._profiler: torch.profiler.profile | None = None

    def __enter__(self) -> AllocatorPeak:
        if self.device.type == "cuda":
            self._cuda.__enter__()
        else:
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            with _stderr_silenced():  # the profiler's C++ side logs a start line on every start
                self._profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._cuda.__exit__(*exc)
            self.peak = self._cuda.allocated
            return
        assert self._profiler is not None
        with _stderr_silenced():
            self._profiler.__exit__(*exc)
        events = [
            e
            for e in self._profiler.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
        running = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            running += event.nbytes()
            peak = max(peak, running)
        self.peak = peak


class LiveBytes(TorchDispatchMode):
    """The allocator's running total, followed on any device, ``meta`` included: every storage an op creates is
    counted when it appears and uncounted when it dies (a weak reference to its preserved Python storage object),
    so ``peak`` is the largest sum of live bytes above the start, what :class:`AllocatorPeak` measures on a real
    device, without allocating. ``watch`` registers storages that already exist (last step's gradients, optimizer
    state) so that freeing them during the phase counts too, as it does for the allocator. Buffers an op uses
    internally without returning them (e.g. a convolution's workspace) are not seen."""

    def __init__(self, watch: Iterable[torch.Tensor | None] = ()) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._live: set[int] = set()
        for t in watch:
            if t is not None:
                self._track(t, count=False)

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.current -= nbytes

    def _track(self, t: torch.Tensor, count: bool = True) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        self._live.add(key)
        nbytes = storage.nbytes()
        weakref.finalize(storage, self._free, key, nbytes)
        if count:
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of distinct storages among ``tensors`` (shared or tied tensors counted once; None skipped)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = (storage._cdata, storage.nbytes())  # identity, not address: meta tensors all sit at 0
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def frozen_param_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters that no optimizer steps (EMA copies): held in memory, never updated by
    gradients."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)


def model_state_bytes(params: Iterable[torch.nn.Parameter], optimizer_state: Iterable[torch.Tensor]) -> dict:
    """Parameter, gradient and optimizer-state bytes, reported separately from activations.

    These are the memory a method cannot save by going local (every parameter, its gradient and its momentum
    buffer exist in every method); aux nets add to all three. Gradients are counted as they are *now*, so call
    this after a training step (``zero_grad(set_to_none=True)`` frees them before the next one).
    """
    params = list(params)
    state = list(optimizer_state)
    return {
        "param_bytes": tensor_bytes(params),
        "grad_bytes": tensor_bytes(p.grad for p in params),
        "optim_state_bytes": tensor_bytes(state),
    }


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux ≥ 4.0: write ``5`` to ``/proc/self/clear_refs``).

    Without a reset the peak RSS is a high-water mark over the whole process, so the second method measured in
    one process would inherit the first one's peak. Returns whether the reset worked (False elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` (honours :func:`reset_peak_rss`), else
    ``resource.getrusage`` (KiB on Linux, bytes on macOS). A coarse figure: it includes the interpreter, torch,
    the data and allocator caching, so use it as a sanity check on the saved-tensor meter, not as the result."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
