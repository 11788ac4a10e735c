"""``locallearn bench pipeline --simulate K``: K-device throughput of PPLL and of GPipe/1F1B predicted from stage
times measured in one process and transfer times measured between two (docs/pipeline.md, "The simulator").

Notation as in docs/pipeline.md: K stages, global batch B, M micro-batches. Measured, per stage k:

* ``ll[k]``: one local-learning stage step on the whole batch (forward, aux net and local loss, backward, optimizer
  step), exactly the code PPLL runs (:func:`~locallearn.parallel.ppll.stage_step`);
* ``fwd[M][k]``, ``bwd[M][k]``: end-to-end forward and backward of module k on a micro-batch of B/M (the last
  stage includes the task loss; stages > 0 also compute their input gradient, which a pipeline sends back);
* ``opt[k]``: module k's optimizer step (backbone parameters only);
* ``comm[M][k]``: one-way transfer of boundary k's activation (micro-batch B/M) between two processes; a gradient
  has the activation's shape, so it costs the same.

Formulas (every transfer is counted on the receiving stage's critical path, i.e. not overlapped):

* one device: sequential LL ``Σ ll``; E2E ``Σ (fwd[1] + bwd[1] + opt)``;
* PPLL: step ``max_k (ll[k] + comm[1][k-1])``, fill ``Σ ll + Σ comm[1]`` (paid once);
* GPipe and 1F1B (same step time): with ``T_k = fwd[M][k] + bwd[M][k] + comm[M][k-1] + comm[M][k]`` (the
  activation in from k-1, the gradient in from k+1), step ``Σ_k T_k + (M−1)·max_k T_k + max_k opt[k]``; balanced
  stages give the familiar ``(M+K−1)·T``.

Not modelled: the upstream messages of add-ons across stages (MAN/LAM EMA weights every ``ppll.ema_every`` steps,
cascade input gradients, :mod:`locallearn.parallel.cross_stage`); for such methods the PPLL prediction is an upper
bound and the report says so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from ..data.datasets import dataset_spec
from ..models.units import backward_carry, carry_tensors, detach_carry
from ..parallel.ppll import stage_step
from ..tasks.task import Batch
from ..train.build import build_engine
from ..train.config import TrainCfg


@dataclass
class StageCosts:
    """Measured seconds (module docstring); dict keys are micro-batch counts M (1 = the whole batch)."""

    batch_size: int
    ll: list[float]
    fwd: dict[int, list[float]]
    bwd: dict[int, list[float]]
    opt: list[float]
    comm: dict[int, list[float]]
    ends: list[int] = field(default_factory=list)  # the split the stages were measured on

    @property
    def k(self) -> int:
        return len(self.ll)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the micro-batch keys become strings."""
        data = asdict(self)
        return {key: {str(m): v for m, v in val.items()} if isinstance(val, dict) else val for key, val in data.items()}


def sequential_step(c: StageCosts) -> float:
    return sum(c.ll)


def e2e_step(c: StageCosts) -> float:
    return sum(c.fwd[1]) + sum(c.bwd[1]) + sum(c.opt)


def _inbound(c: StageCosts, m: int, k: int) -> float:
    """Transfer seconds stage k receives per micro-batch: the activation from k-1 (PPLL, and GPipe/1F1B forward)."""
    return c.comm[m][k - 1] if k > 0 else 0.0


def ppll_step(c: StageCosts) -> float:
    return max(c.ll[k] + _inbound(c, 1, k) for k in range(c.k))


def ppll_fill(c: StageCosts) -> float:
    return sum(c.ll) + sum(c.comm[1])


def pipeline_stage_times(c: StageCosts, m: int) -> list[float]:
    """Per-micro-batch time of each stage of GPipe/1F1B: compute plus activation in and gradient in."""
    grad_in = [c.comm[m][k] if k < c.k - 1 else 0.0 for k in range(c.k)]
    return [c.fwd[m][k] + c.bwd[m][k] + _inbound(c, m, k) + grad_in[k] for k in range(c.k)]


def pipeline_step(c: StageCosts, m: int) -> float:
    t = pipeline_stage_times(c, m)
    return sum(t) + (m - 1) * max(t) + max(c.opt)


def predict(c: StageCosts, micro: list[int]) -> dict[str, float]:
    """Predicted samples/s of every row the formulas cover, keyed like the bench's rows."""
    b = c.batch_size
    out = {"e2e": b / e2e_step(c), "sequential": b / sequential_step(c), "ppll": b / ppll_step(c)}
    for m in micro:
        out[f"gpipe M={m}"] = out[f"1f1b M={m}"] = b / pipeline_step(c, m)
    return out


class _NoLink:
    """Stands in for the PPLL link when a stage is timed alone: nothing to send."""

    rank, world = 0, 1

    def send(self, *args: object) -> None:
        pass


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitives
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_stage_costs(
    cfg: TrainCfg, batch: Batch, micro: list[int], comm: dict[int, list[float]], repeats: int = 5
) -> StageCosts:
    """Time every stage of ``cfg``'s split in this process (CPU: run with the bench's threads per process).

    A throwaway engine is trained along the way (its weights change; timings do not depend on them).
    """
    device = batch.input.device
    engine = build_engine(cfg, dataset_spec(cfg.data.name), device, batch.input)
    engine.backbone.train()
    engine.method.train()
    ms = sorted({1, *micro})
    ll, opt, fwd, bwd = [], [], {m: [] for m in ms}, {m: [] for m in ms}
    x = batch.input
    for k, module in enumerate(engine.modules):
        ll.append(_median_time(lambda k=k, x=x: stage_step(engine, k, x, batch, _NoLink(), 0), repeats))
        last = k == engine.k - 1
        for m in ms:
            size = len(batch) // m
            part = Batch(tree_map_only(torch.Tensor, lambda t, size=size: t[:size], x), batch.target[:size])

            def forward(module=module, part=part, k=k, last=last) -> Any:
                out = module(detach_carry(part.input, requires_grad=k > 0))
                return engine.task.loss(out, part) if last else out

            def backward(forward=forward) -> None:
                out = forward()
                backward_carry(out, [torch.ones_like(t) for t in carry_tensors(out)])

            fwd[m].append(_median_time(forward, repeats))
            bwd[m].append(max(0.0, _median_time(backward, repeats) - fwd[m][-1]))
        aux = engine.method.aux[k]
        for p in [] if aux is None else aux.parameters():
            p.grad = None  # time the step of the backbone parameters only, as a pipeline stage has
        opt.append(_median_time(lambda k=k: engine.step_module(k), repeats))
        with torch.no_grad():
            x = module(x)
    return StageCosts(len(batch), ll, fwd, bwd, opt, comm, list(engine.ends))


def default_micro(k: int, batch_size: int) -> list[int]:
    """M ∈ {K, 2K, 4K} (docs/pipeline.md, "Measurement rules") that split the batch into equal micro-batches."""
    return [m for m in (k, 2 * k, 4 * k) if batch_size % m == 0]
