"""PPLL evaluation for any task: a forward-only chain; the sequential engine is the oracle, so PPLL logs exactly
its keys (docs/pipeline.md, "Design and where it comes from").

Each stage runs the forward-only chain over the *whole* test set (stage k receives stage k-1's activations) and
feeds its own predictions to one ``task.metrics()`` accumulator: the aux head's on stages 0..K-2, the final
output (and its loss) on the last stage. Because every stage sees every test batch, a stage's ``compute()`` is
already its final value; no sums need reducing, which matters for metrics that are not sums (mAP). The stages'
small result dicts are gathered with one ``all_gather_object`` and rank 0 builds the same keys as
:meth:`~locallearn.train.engine.LocalEngine.evaluate`: ``test_<metric>`` for every metric, ``test_loss`` and
``aux_<headline>`` by depth (None where a stage has no head that predicts the task). With replicated pipelines
only replica 0's stages report (replicas hold replica 0's BN buffers, so theirs would be identical).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..tasks.task import Batch, Task
from ..train.engine import LocalEngine
from .link import EVAL, Link


@torch.no_grad()
def stage_evaluate(
    engine: LocalEngine, k: int, loader, link: Link, send_labels: bool = False
) -> dict[str, float] | None:
    """Stage k's metrics over the test set: ``task.metrics().compute()`` of its aux head's predictions (None
    without one), or on the last stage of the final output, with ``loss`` added. Every stage must call it (it
    forwards the activations downstream). ``send_labels`` (``ppll.labels: send``): stage 0 alone reads the test
    set and the targets travel with the activations."""
    engine.backbone.eval()
    engine.method.eval()
    last = k == engine.k - 1
    metric, has_head = engine.task.metrics(), False
    loss_sum, seen = torch.zeros((), device=engine.device), 0
    own_data = loader.batches() if k == 0 or not send_labels else [None] * len(loader)
    for i, item in enumerate(own_data):
        batch = None if item is None else Batch(*item)
        if send_labels:
            batch = link.relay_data(i, batch)[0]
        x = batch.input if k == 0 else link.recv(EVAL, i)[2]
        with engine.autocast():
            h = engine.modules[k](x)
            link.send(EVAL, i, h)
            prediction = h if last else engine.method.aux_logits(k, h)
            if prediction is not None:
                has_head = True
                metric.update(prediction, batch)
            if last:
                loss_sum += engine.task.loss(h, batch) * len(batch)
        seen += len(batch)
    if not has_head:
        return None
    result = metric.compute()
    if last:
        result["loss"] = loss_sum.item() / max(seen, 1)
    return result


def gather_evaluation(task: Task, report: dict[str, float] | None, stages: int, replica: int) -> dict[str, Any]:
    """Every rank passes its :func:`stage_evaluate` result (one collective call); returns the engine's evaluation
    keys built from replica 0's stages (ranks 0..K-1), e.g. ``test_psnr``, ``test_ssim``, ``test_loss``,
    ``aux_psnr``."""
    reports: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report if replica == 0 else None)
    *aux, final = reports[:stages]
    name = task.headline
    return {
        **{f"test_{key}": value for key, value in (final or {}).items()},
        f"aux_{name}": [None if r is None else r[name] for r in aux],
    }
