"""The CUDA path, run by ``scripts/gpu_check.sh`` on a GPU machine (skipped elsewhere): every method and add-on
trains on the GPU in fp32, bf16 and fp16 with no host synchronisation inside a step, the step peak meter equals
``max_memory_allocated``, and the resident loader serves channels_last batches on the device."""

from __future__ import annotations

import pytest
import torch

from locallearn import Batch, ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.measure import AllocatorPeak

from .test_engine import make_batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]

METHODS = {
    "e2e": MethodCfg(name="e2e"),
    "dgl": MethodCfg(name="dgl"),
    "infopro": MethodCfg(name="infopro"),
    "dgl+man": MethodCfg(name="dgl", addons=["man"], ema_warmup=True),
    "infopro+hpff": MethodCfg(name="infopro", addons=["cascade", "pff"], cascade_final="both"),
    "dgl+mlaan": MethodCfg(name="dgl", addons=["cascade", "lam"], cascade_final="both"),
    "dgl+ckpt": MethodCfg(name="dgl", checkpoint=2),
}


def cuda_engine(cfg: MethodCfg, precision: str) -> LocalEngine:
    torch.manual_seed(0)
    backbone = create_model("resnet20", num_classes=4, in_channels=1, width=8)
    k = 1 if cfg.name == "e2e" else 3
    return LocalEngine(
        backbone, cfg, ClassificationTask(4), OptimCfg(lr=0.05), split=k, device="cuda", precision=precision
    )


def on_cuda(batch: Batch) -> Batch:
    return Batch(batch.input.cuda(), batch.target.cuda(), None if batch.raw is None else batch.raw.cuda())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_learns_on_cuda_without_host_syncs(name: str, precision: str) -> None:
    engine = cuda_engine(METHODS[name], precision)
    batch = on_cuda(make_batch(n=64))
    first = engine.train_step(batch).losses()[-1]  # first step: cuDNN autotuning, optimizer state
    # fp16's GradScaler reads the inf check on the host by design; everything else must stay asynchronous.
    torch.cuda.set_sync_debug_mode("error" if precision != "fp16" else "default")
    try:
        for _ in range(20):
            result = engine.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    last = result.losses()[-1]
    assert torch.isfinite(torch.tensor(last)) and last < first


def test_step_peak_on_cuda_is_max_memory_allocated_above_the_start() -> None:
    x = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    with AllocatorPeak("cuda") as peak:
        a = torch.empty(3 * 2**20, dtype=torch.uint8, device="cuda")
        del a
    assert peak.peak == 3 * 2**20
    del x


def test_resident_loader_serves_channels_last_batches_on_the_gpu(synthetic_root, tmp_path) -> None:
    from locallearn.train import load_config
    from locallearn.train.build import build_loaders

    from .conftest import tiny_overrides

    cfg = load_config(None, [*tiny_overrides(synthetic_root, tmp_path), "run.device=cuda"])
    train, _, _ = build_loaders(cfg, torch.device("cuda"))
    x, y, raw = next(iter(train.batches(0)))
    assert x.is_cuda and y.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
