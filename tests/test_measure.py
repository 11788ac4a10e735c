"""The saved-tensor meter on hand-computable models, and local vs E2E activation memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.measure import SavedTensorMeter, count_params, forward_flops
from locallearn.train.config import SplitCfg

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
        MethodCfg(name=name),
        ClassificationTask(4),
        OptimCfg(),
        split=SplitCfg(k=k),
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


def test_allocator_peak_is_the_largest_running_sum_of_allocations() -> None:
    """1 MiB allocated and freed, then 3 + 1 MiB alive together: the peak above the start is 4 MiB exactly."""
    from locallearn.measure import AllocatorPeak

    with AllocatorPeak("cpu") as m:
        a = torch.empty(2**20, dtype=torch.uint8)
        del a
        b, c = torch.empty(3 * 2**20, dtype=torch.uint8), torch.empty(2**20, dtype=torch.uint8)
        del b, c
    assert m.peak == 4 * 2**20


def test_train_step_flops_count_recomputation_and_cascade_hops() -> None:
    """A whole step's FLOPs: checkpointing adds the forward of every recomputed segment; a cascade of span 2
    walks each module graph again; E2E ≈ 3× its forward (backward = 2× forward for convs and linears)."""
    from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
    from locallearn.bench.bench import train_step_flops
    from locallearn.measure import forward_flops

    from .test_engine import make_batch

    def engine(k: int, **cfg):
        torch.manual_seed(0)
        backbone = create_model("resnet8", num_classes=4, in_channels=1, width=4)
        return LocalEngine(backbone, MethodCfg(**cfg), ClassificationTask(4), OptimCfg(), split=k)

    batch = make_batch()
    plain, ckpt = engine(name="e2e", k=1), engine(name="e2e", k=1, checkpoint=2)  # 5 units: segments [0,2) [2,5)
    forward = forward_flops(plain.modules[0], batch.input)
    first_segment = forward_flops(torch.nn.Sequential(*list(plain.modules[0])[:2]), batch.input)
    assert train_step_flops(plain, batch) == pytest.approx(3 * forward, rel=0.02)
    assert train_step_flops(ckpt, batch) == train_step_flops(plain, batch) + first_segment
    dgl = engine(name="dgl", k=3, dgl_head="mlp")
    cascade = engine(name="dgl", k=3, dgl_head="mlp", addons=["cascade"], cascade_final="plain")
    assert train_step_flops(cascade, batch) > 1.3 * train_step_flops(dgl, batch)


def test_meter_leaves_no_cycle_behind_a_retained_graph() -> None:
    """exp saves its own output; had the meter handed autograd that very tensor, a graph kept with
    ``retain_graph=True`` (every cascade step) would hold itself alive after its last reference is gone."""
    x = torch.randn(64, requires_grad=True)
    with SavedTensorMeter() as meter:
        z = (x * 2).exp()
        alias = weakref.ref(z.untyped_storage())
        loss = z.sin().sum()
    del z
    loss.backward(retain_graph=True)
    assert meter.peak == 64 * 4 and alias() is not None  # exp's output is sin's input: one storage
    del loss
    gc.collect()
    assert alias() is None


def test_the_meter_works_under_torch_compile() -> None:
    """The meter's hook runs eagerly beside a compiled module: no dynamo guard on its bookkeeping (the guard used
    to fail on the frame that made it: "len(G['weakref'].finalize._registry) != N"), and it counts what the
    compiled graph saves."""
    from torch import nn

    from locallearn.measure import SavedTensorMeter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())
    x = torch.randn(4, 3, 16, 16)
    model.compile(backend="aot_eager")  # in place, as the engine compiles its modules
    for _ in range(2):  # the second call runs under the first call's guards
        meter = SavedTensorMeter()
        with meter:
            model(x).sum().backward()
        assert meter.peak > 0
