"""Every preset under configs/ builds its engine through ``train.build.build_engine`` and runs a forward pass on a
tiny probe (thin networks, at most 64 px, 4 images), without reading any data file: the split exists for the
backbone, every module's aux net fits its feature map, and the last module predicts the dataset's classes.
(``tests/test_config.py`` checks that each file loads and round-trips; the CIFAR-10 add-on presets are built and
trained by ``tests/test_addons.py``, so they are left out here.)"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from locallearn.data import dataset_spec
from locallearn.tasks.task import Batch
from locallearn.train.build import build_engine
from locallearn.train.config import load_config

from .test_addons import ADDON_PRESET_FILES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_PRESETS = sorted(CONFIGS.glob("**/*.yaml"))
# Classification presets; super-resolution and detection presets are built and trained by test_sr/test_detection.
PRESETS = [
    p
    for p in ALL_PRESETS
    if p not in {f.resolve() for f in ADDON_PRESET_FILES} and p.parent.name not in ("sr", "detection")
]
THIN = {"resnet": 4, "vit": 32}  # model.width for the probe: ResNets 4 channels, ViTs 32-dim tokens (1 head)


def probe_config(path: Path):
    cfg = load_config(path, ["run.device=cpu"])
    width = THIN["vit"] if cfg.model.name.startswith("vit") else THIN["resnet"]
    return load_config(path, ["run.device=cpu", f"model.width={width}"])


def test_every_dataset_directory_is_covered() -> None:
    assert {p.parent.name for p in ALL_PRESETS} >= {"cifar10", "svhn", "stl10", "imagenet"}
    assert len(PRESETS) < len(ALL_PRESETS)  # the add-on presets are found (and left to test_addons)
    imagenet = {p.stem for p in CONFIGS.glob("imagenet/*.yaml")}
    for model in ("resnet101", "resnet152"):
        assert {f"{model}_e2e", f"{model}_infopro_star_k2", f"{model}_infopro_k4", f"{model}_dgl_k4"} <= imagenet
    for model in ("vit_tiny", "vit_small", "vit_base"):
        assert {f"{model}_e2e", f"{model}_dgl_k4", f"{model}_infopro_k4"} <= imagenet


@pytest.mark.parametrize("path", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_preset_builds_an_engine_on_a_probe(path: Path) -> None:
    cfg = probe_config(path)
    spec = dataset_spec(cfg.data.name)
    size = min(spec.size, 64)
    raw = torch.randint(
        0, 256, (4, spec.channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    x = (raw.float() / 255 - 0.5).contiguous(memory_format=torch.channels_last)
    target, out_shape = torch.arange(4) % spec.num_classes, (4, spec.num_classes)
    if spec.task == "language_model":  # token ids in, next-token logits out
        x = torch.randint(0, spec.num_classes, (4, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
        raw, target, out_shape = None, x.roll(-1, 1), (4, cfg.data.seq_len, spec.num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the papers' K labels (MAN "K=16" = 15 modules) warn
        engine = build_engine(cfg, spec, torch.device("cpu"), x)
    assert engine.k == len(engine.ends) and engine.ends[-1] == len(engine.backbone)
    batch = Batch(x, target, raw)
    h = x
    engine.backbone.train()
    engine.method.train()
    with torch.no_grad():
        for k, module in enumerate(engine.modules):
            h = module(h)
            loss = engine.method.local_loss(k, h, batch)
            assert math.isfinite(float(loss)), (k, float(loss))
    assert h.shape == out_shape
