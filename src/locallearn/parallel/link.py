"""The PPLL wire protocol: typed, step-stamped point-to-point messages between the stages of one pipeline
(docs/pipeline.md, "The wire protocol" and "Design and where it comes from").

Every message is a header, then (unless the kind carries none) one payload tensor. The header is
``HEADER`` int64 values: ``kind, step, dtype code, a, b, ndim, d0..d4``; ``a``/``b`` are kind-specific (a
gradient's origin stage and remaining reach). The receiver allocates the payload from the header (shape and
dtype), so ragged last batches and bf16 activations need no agreement beforehand, and checks kind and step: a
mismatch is an error naming both stages, never a silent misalignment.

Kinds and channels:

* downstream, stage k → k+1, default process group, tag 0: ``TRAIN`` (activation of step t), ``EVAL``
  (activation of evaluation batch i; a captured model's carry of skips and tokens goes as one message per
  tensor, ``a`` = its index, ``b`` = their count), ``STOP`` (end of run, no payload), and with ``ppll.labels: send``
  ``DATA`` (three messages for batch t: the input's shape, with ``a`` = 1 when raw images follow and ``b`` =
  the size of the whole global batch so a replica knows its share; the targets; the raw images), sent *before*
  the activation so a stage can pass them on before computing;
* upstream, on a second process group (``back``) so that NCCL never orders them against the downstream traffic
  on one communicator: ``GRAD``/``NOGRAD`` (tag 1; a cascade's input gradient, or the marker that this origin
  has none this step) and ``WEIGHTS`` (tag 2; a later stage's unit parameters for EMA copies), from any later
  stage of the same pipeline.

Sends are ``isend`` with at most ``window`` messages in flight per direction (back-pressure: a stage never runs
more than ``window`` messages ahead of its consumer). Receives from stage k-1 are pre-posted: as soon as one
message has arrived, an ``irecv`` for the next header (fixed size) is posted, so the upstream stage's next send
is matched while this stage computes; the payload, whose shape the header gives, is received right after it.

A receive or a send that fails (a peer died: gloo reports the closed connection) or that exceeds the process
group's timeout raises :class:`StageError`, one line naming this stage and the silent one; the runtime lets it
end the process with a non-zero status.

With replicated pipelines (``ppll.replicas``), rank = replica · stages + stage, and a link only talks to the
stages of its own replica.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..tasks.task import Batch

TRAIN, EVAL, STOP, GRAD, NOGRAD, WEIGHTS, DATA = range(7)
KINDS = ("TRAIN", "EVAL", "STOP", "GRAD", "NOGRAD", "WEIGHTS", "DATA")
EMPTY = (STOP, NOGRAD)  # kinds without a payload
TAGS = {GRAD: 1, NOGRAD: 1, WEIGHTS: 2}  # upstream tags; downstream messages use tag 0
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8)
MAX_DIMS = 5
HEADER = 6 + MAX_DIMS


class StageError(RuntimeError):
    """A pipeline peer failed or stopped answering (one line: which stage, what happened)."""


def _header(kind: int, step: int, payload: torch.Tensor | None, extra: tuple[int, int]) -> torch.Tensor:
    shape = () if payload is None else tuple(payload.shape)
    if len(shape) > MAX_DIMS:
        raise ValueError(f"PPLL sends tensors of at most {MAX_DIMS} dims, got shape {shape}")
    dtype = 0 if payload is None else DTYPES.index(payload.dtype)
    values = [kind, step, dtype, *extra, len(shape), *shape] + [0] * (MAX_DIMS - len(shape))
    return torch.tensor(values, dtype=torch.int64)


def short_error(e: BaseException) -> str:
    """The first line of an error, without gloo's source location and advice."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[^\]]*\] ", "", text).split(". This is typically")[0]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """Point-to-point traffic of one rank: activations from stage k-1 and to stage k+1, and the upstream messages
    of the cross-stage add-ons (:mod:`.cross_stage`), each direction with a bounded send window.

    ``stages``: length of one pipeline (default ``world``: one pipeline); ``back``: the process group of the
    upstream messages (None when nothing travels upstream).
    """

    def __init__(
        self,
        rank: int,
        world: int,
        window: int,
        channels_last: bool,
        device: torch.device,
        *,
        stages: int | None = None,
        back: Any = None,
    ) -> None:
        self.rank, self.world, self.window, self.channels_last = rank, world, max(1, window), channels_last
        self.stages = stages or world
        self.stage, self.replica = rank % self.stages, rank // self.stages
        self.device, self.back = device, back  # NCCL moves CUDA tensors; gloo on CPU moves CPU tensors
        self.pending: list[Any] = []  # (work, buffer, peer stage) of downstream sends
        self.pending_up: list[Any] = []  # the same for upstream sends
        self.pending_data: list[Any] = []  # the same for DATA sends (ppll.labels: send)
        self.next_header: tuple[Any, torch.Tensor] | None = None  # pre-posted receive of stage k-1's next header
        self.idle = 0.0  # seconds blocked in recv or on a send window: wall - idle = this stage's busy time
        self.on_shutdown: list[Callable[[int], None]] = []  # run first in shutdown (drain upstream messages)

    @property
    def name(self) -> str:
        return f"stage {self.stage}" + (f" (replica {self.replica})" if self.stages < self.world else "")

    def _rank_of(self, stage: int) -> int:
        return self.replica * self.stages + stage

    # ---- generic send / receive ------------------------------------------------------------------------------
    def _post(
        self,
        stage: int,
        kind: int,
        step: int,
        tensor: torch.Tensor | None,
        extra: tuple[int, int],
        group: Any,
        queue: list[Any],
        per_step: int = 1,
    ) -> None:
        payload = None if tensor is None else tensor.detach().contiguous()
        header = _header(kind, step, payload, extra).to(self.device)
        peer, tag = self._rank_of(stage), TAGS.get(kind, 0)
        queue.append((dist.isend(header, peer, group=group, tag=tag), header, stage))
        if payload is not None:
            queue.append((dist.isend(payload, peer, group=group, tag=tag), payload, stage))  # keep buffer alive
        while len(queue) > 2 * self.window * per_step:  # back-pressure: at most `window` steps in flight
            self._wait(queue.pop(0))

    def _take(
        self, stage: int, kinds: tuple[int, ...], step: int | None, group: Any, tag: int
    ) -> tuple[int, int, tuple[int, int], torch.Tensor | None]:
        peer, start = self._rank_of(stage), time.perf_counter()
        downstream = group is None and tag == 0  # the activation channel from stage k-1
        try:
            if downstream and self.next_header is not None:
                work, header = self.next_header
                self.next_header = None
                work.wait()
            else:
                header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
                dist.recv(header, peer, group=group, tag=tag)
            values = header.tolist()  # one device-to-host read per message (NCCL: the header lives on the GPU)
            kind, got_step, dtype, a, b, ndim = values[:6]
            payload = None
            if kind not in EMPTY:
                shape = tuple(values[6 : 6 + ndim])
                payload = torch.empty(shape, dtype=DTYPES[dtype], device=self.device)
                dist.recv(payload, peer, group=group, tag=tag)
            if downstream and kind != STOP:  # pre-post the next header: the sender's next isend finds it waiting
                following = torch.empty(HEADER, dtype=torch.int64, device=self.device)
                self.next_header = (dist.irecv(following, peer, tag=0), following)
        except RuntimeError as e:
            raise StageError(f"{self.name}: stage {stage} stopped answering ({short_error(e)})") from None
        finally:
            self.idle += time.perf_counter() - start
        if kind not in kinds or (step is not None and got_step != step):
            want = "/".join(KINDS[k] for k in kinds)
            raise StageError(
                f"{self.name}: expected {want} of step {step} from stage {stage}, got "
                f"{KINDS[kind] if 0 <= kind < len(KINDS) else kind} of step {got_step}; the ranks' configs differ"
            )
        return kind, got_step, (a, b), payload

    def _wait(self, item: Any) -> None:
        work, _, stage = item
        start = time.perf_counter()
        try:
            work.wait()
        except RuntimeError as e:
            raise StageError(f"{self.name}: stage {stage} stopped receiving ({short_error(e)})") from None
        finally:
            self.idle += time.perf_counter() - start

    # ---- downstream: activations -----------------------------------------------------------------------------
    def send(self, kind: int, step: int, tensor: Any = None) -> None:
        """To stage k+1 (nothing on the last stage). A captured model's carry (a tuple of tensors: the main
        activation, then skips and tokens) goes as one message per tensor, ``a`` = its index, ``b`` = their count
        (0 for a plain tensor)."""
        if self.stage == self.stages - 1:
            return
        parts = tensor if isinstance(tensor, tuple) else (tensor,)
        count = len(parts) if isinstance(tensor, tuple) else 0
        for i, part in enumerate(parts):
            self._post(self.stage + 1, kind, step, part, (i, count), None, self.pending, per_step=len(parts))

    def recv(self, expect_kind: int | None, expect_step: int | None) -> tuple[int, int, Any]:
        """From stage k-1: ``(kind, step, payload)``; the payload is a tensor or a carry tuple (see :meth:`send`);
        4-D tensors come back channels_last when the model is."""
        kinds = tuple(range(len(KINDS))) if expect_kind is None else (expect_kind,)
        kind, step, (_, count), payload = self._take(self.stage - 1, kinds, expect_step, None, 0)
        parts = [payload] + [self._take(self.stage - 1, (kind,), step, None, 0)[3] for _ in range(count - 1)]
        if self.channels_last:
            parts = [
                p.contiguous(memory_format=torch.channels_last) if p is not None and p.dim() == 4 else p for p in parts
            ]
        return kind, step, tuple(parts) if count else parts[0]

    def send_data(self, step: int, batch: Batch, whole: int) -> None:
        """Batch ``step``'s input shape, targets and raw images (if any) to stage k+1 (``ppll.labels: send``);
        ``whole``: the size of the global batch this (possibly sharded) part came from. Sent ahead of the
        activation on the same channel, so the activation window also bounds them; their own queue only keeps
        their buffers alive."""
        if self.stage == self.stages - 1:
            return
        shape = torch.tensor(batch.input.shape, dtype=torch.int64)
        extra = (int(batch.raw is not None), whole)
        for i, tensor in enumerate(t for t in (shape, batch.target, batch.raw) if t is not None):
            self._post(self.stage + 1, DATA, step, tensor, extra if i == 0 else (0, 0), None, self.pending_data, 3)

    def recv_data(self, step: int) -> tuple[Batch, int]:
        """``(batch, whole)`` of step ``step`` from stage k-1 (:meth:`send_data`). The image itself stays on stage
        0: the batch's input is a zero-memory placeholder of its shape (for ``len``, sizes and devices)."""

        def take() -> tuple[tuple[int, int], torch.Tensor]:
            _, _, extra, payload = self._take(self.stage - 1, (DATA,), step, None, 0)
            return extra, payload

        (has_raw, whole), shape = take()
        target, raw = take()[1], take()[1] if has_raw else None
        image = torch.zeros((), device=self.device).expand(*shape.tolist())
        return Batch(image, target, raw), whole

    def relay_data(self, step: int, batch: Batch | None, whole: int = 0) -> tuple[Batch, int]:
        """``ppll.labels: send``: stage 0 passes its ``batch`` (part of a global batch of ``whole`` samples; 0 =
        the batch itself) on; a later stage (``batch`` None) takes batch ``step`` from stage k-1 and passes it on
        at once, before computing, so stage k+1 never waits for this one. Returns ``(batch, whole)``."""
        if batch is None:
            batch, whole = self.recv_data(step)
        whole = whole or len(batch)
        self.send_data(step, batch, whole)
        return batch, whole

    # ---- upstream: cascade gradients and EMA weights ---------------------------------------------------------
    def post_up(
        self, stage: int, kind: int, step: int, tensor: torch.Tensor | None = None, extra: tuple[int, int] = (0, 0)
    ) -> None:
        """To an earlier ``stage`` of this pipeline, on the ``back`` group (never blocks beyond the window)."""
        self._post(stage, kind, step, tensor, extra, self.back, self.pending_up)

    def take_up(
        self, stage: int, kinds: tuple[int, ...], step: int
    ) -> tuple[int, int, tuple[int, int], torch.Tensor | None]:
        """From a later ``stage``: ``(kind, step, (a, b), payload)``."""
        return self._take(stage, kinds, step, self.back, TAGS[kinds[0]])

    # ---- end of epoch, end of run ----------------------------------------------------------------------------
    def flush(self) -> None:
        for queue in (self.pending_data, self.pending, self.pending_up):
            for item in queue:
                self._wait(item)
            queue.clear()

    def shutdown(self, step: int) -> None:
        """Orderly end: pending upstream messages are drained, then STOP travels down the pipe, so no rank exits
        with a send in flight (docs/pipeline.md, "Checkpoints, resume and failure handling")."""
        for hook in self.on_shutdown:
            hook(step)
        if self.stage > 0:
            self.recv(STOP, step)
        self.send(STOP, step)
        self.flush()
        dist.barrier()
