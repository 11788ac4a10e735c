"""The meta-device estimator behind ``locallearn summary``: byte for byte the real saved-tensor meter at small
sizes (every method, add-on and checkpointing), the real parameter/gradient/optimizer bytes and training FLOPs,
and the largest presets (ImageNet ResNet-152 at batch 1024, ViT-B) summarised in seconds and little memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from locallearn import LocalEngine
from locallearn.bench.bench import train_step_flops
from locallearn.data.datasets import dataset_spec
from locallearn.data.detection import render_shapes
from locallearn.measure import SavedTensorMeter, model_state_bytes
from locallearn.tasks.task import Batch
from locallearn.train import load_config
from locallearn.train.build import build_engine
from locallearn.train.estimate import META_BOXES, estimate_step

from .test_engine import make_batch

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "e2e": ["method.name=e2e", "split.k=1"],
    "dgl": ["method.name=dgl", "split.k=3"],
    "infopro": ["method.name=infopro", "split.k=3"],
    "dgl+man": ["method.name=dgl", "split.k=3", "method.addons=[man]", "method.ema_warmup=true"],
    "infopro+manpp": ["method.name=infopro", "split.k=3", "method.addons=[man]", "method.bridge_combine=scaled"],
    "dgl+hpff": ["method.name=dgl", "split.k=3", "method.addons=[cascade,pff]", "method.cascade_final=both"],
    "infopro+mlaan": ["method.name=infopro", "split.k=3", "method.addons=[cascade,lam]", "method.cascade_final=both"],
    "dgl+ckpt": ["method.name=dgl", "split.k=2", "method.checkpoint=2"],
    "e2e+ckpt": ["method.name=e2e", "split.k=1", "method.checkpoint=sqrt"],
    "adamw": ["method.name=infopro", "split.k=3", "optim.name=adamw"],
}


def real_step(cfg, batch: Batch) -> tuple[LocalEngine, int, int]:
    """(engine, training FLOPs of one step, saved-tensor peak of the next) on real CPU tensors."""
    engine = build_engine(cfg, dataset_spec(cfg.data.name), torch.device("cpu"), batch.input)
    flops = train_step_flops(engine, batch)
    engine.meter = meter = SavedTensorMeter()
    with meter:
        engine.train_step(batch)
    return engine, flops, meter.peak


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_equals_the_real_meter_and_state(name: str) -> None:
    overrides = ["model.name=resnet20", "model.width=8", "data.batch_size=16", *CASES[name]]
    cfg = load_config("configs/fmnist/demo.yaml", overrides)
    est = estimate_step(cfg)
    engine, flops, peak = real_step(cfg, make_batch(n=16, size=28, seed=0))
    assert est.step_act_peak == peak > 0
    params = [p for k in range(engine.k) for p in engine.module_parameters(k)]
    assert {k: v for k, v in est.state.items() if k != "frozen_param_bytes"} == model_state_bytes(
        params, engine.optimizer_tensors()
    )
    assert est.train_flops == flops
    assert est.ends == engine.ends and len(est.modules) == engine.k


@pytest.mark.parametrize("preset", ["shapes_fcos_e2e", "shapes_fcos_dgl_k2", "shapes_fcos_glcan_k4"])
def test_detection_estimate_equals_the_real_meter(preset: str) -> None:
    """Detection too: the loss's shapes never depend on the boxes (the assignment runs without autograd), so the
    estimate, made with a placeholder box count, equals the meter on real images with their own boxes."""
    cfg = load_config(f"configs/detection/{preset}.yaml", ["model.width=8", "data.batch_size=4"])
    est = estimate_step(cfg)
    data = render_shapes(4, size=64, seed=3, max_objects=5)
    real = Batch(torch.from_numpy(data.images).float() / 255, data.targets())
    assert real.target.shape[1] != META_BOXES
    engine, flops, peak = real_step(cfg, real)
    assert est.step_act_peak == peak > 0
    assert est.train_flops == flops and est.ends == engine.ends


def test_summary_takes_a_detection_preset(capsys) -> None:
    from locallearn.cli.main import main

    assert main(["summary", "-c", "configs/detection/shapes_fcos_glcan_k2.yaml"]) == 0
    assert "training step (glcan): saved activations peak" in capsys.readouterr().out


def test_the_largest_presets_summarise_in_seconds_and_little_memory() -> None:
    """ImageNet ResNet-152 E2E at batch 1024 saves ~170 GiB of activations; the estimate needs none of it."""
    code = (
        "import resource, sys, time\n"
        "from locallearn.cli.main import main\n"
        "for c in sys.argv[1:]:\n"
        "    start = time.perf_counter()\n"
        "    assert main(['summary', '-c', c]) == 0\n"
        "    print('TIME', c, time.perf_counter() - start)\n"
        "print('RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    presets = [
        "configs/imagenet/resnet152_e2e.yaml",
        "configs/imagenet/resnet101_dgl_k2.yaml",
        "configs/imagenet/vit_base_infopro_k4.yaml",
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *presets], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True
    ).stdout
    times = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("TIME")]
    rss = int(next(line for line in out.splitlines() if line.startswith("RSS_KB")).split()[-1])
    assert len(times) == 3 and max(times) < 60 and rss < 2 * 2**20, (times, rss)
    assert "saved activations peak 173277.1 MiB" in out  # ResNet-152 E2E, batch 1024 at 224 px
