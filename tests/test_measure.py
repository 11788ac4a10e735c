"""The saved-tensor meter on hand-computable models, and local vs E2E activation memory."""

from __future__ import annotations

import torch
from torch import nn

from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.measure import SavedTensorMeter, count_params, forward_flops

from .test_engine import make_batch


def test_linear_chain_saved_bytes_are_exact() -> None:
    """Linear(16→32) saves its input (B·16·4 B); ReLU saves its output (B·32·4 B), which the next Linear saves
    again (same storage, counted once); weights and their transposed views are parameters, not activations."""
    b = 8
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(b, 16)
    meter = SavedTensorMeter()
    with meter:
        net(x).sum().backward()
    assert meter.peak == b * 16 * 4 + b * 32 * 4


def test_release_resets_current_but_keeps_peak() -> None:
    a, c = nn.Linear(10, 10), nn.Linear(10, 10)
    x = torch.randn(4, 10)
    meter = SavedTensorMeter()
    with meter:
        h = a(x)
        h.sum().backward()
        meter.release()
        c(h.detach()).sum().backward()
    assert meter.peak == 4 * 10 * 4 and meter.current == 4 * 10 * 4
    meter.reset()
    assert meter.peak == 0 and meter.current == 0


def peak_of(name: str, k: int) -> int:
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("resnet8", num_classes=4, in_channels=1, width=8),
        MethodCfg(name=name, k=k),
        ClassificationTask(4),
        OptimCfg(),
    )
    engine.meter = SavedTensorMeter()
    with engine.meter:
        engine.train_step(make_batch(n=32))
    return engine.meter.peak


def test_local_learning_saves_less_than_e2e_and_less_with_more_modules() -> None:
    e2e = peak_of("e2e", 1)
    dgl = [peak_of("dgl", k) for k in (2, 3, 4)]
    assert all(p < e2e for p in dgl)
    assert dgl[0] > dgl[2]
    assert peak_of("dgl", 2) == dgl[0]  # deterministic


def test_counters() -> None:
    lin = nn.Linear(10, 5)
    assert count_params(lin) == 55
    assert forward_flops(lin, torch.randn(3, 10)) == 2 * 3 * 10 * 5
