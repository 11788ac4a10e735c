"""``optim.name``: SGD (the ResNet recipes) and AdamW (MAN++'s ViT recipe) through one ``build_optimizer``, used
by the engine for every module; and the ImageNet scripts' per-epoch cosine that starts at lr0 (``first_epoch``).
Recipes: (docs/configuration.md, "The papers' optimizer recipes")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.train.config import ConfigError, SplitCfg, load_config
from locallearn.train.schedule import StepSchedule, build_optimizer, lr_at

from .test_backbones import CLASSES, make_batch


def params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(3, 2).parameters())


def test_build_optimizer_settings() -> None:
    sgd = build_optimizer(params(), OptimCfg(lr=0.4, momentum=0.9, weight_decay=1e-4))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.4, 0.9, True, 1e-4)
    assert build_optimizer(params(), OptimCfg(momentum=0.0)).param_groups[0]["nesterov"] is False
    adamw = build_optimizer(params(), OptimCfg(name="adamw", lr=1e-3, betas=[0.9, 0.95], eps=1e-6, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    group = adamw.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.95), 1e-6, 0.05)
    with pytest.raises(ValueError, match="optim.betas must be two numbers"):
        build_optimizer(params(), OptimCfg(name="adamw", betas=[0.9]))
    with pytest.raises(ValueError, match="optim.betas"):
        build_optimizer(params(), OptimCfg(name="adamw", betas=[0.9, 1.0]))


def test_config_selects_the_optimizer() -> None:
    cfg = load_config(None, ["optim.name=adamw", "optim.betas=[0.9, 0.98]", "optim.eps=1e-7"])
    assert (cfg.optim.name, cfg.optim.betas, cfg.optim.eps) == ("adamw", [0.9, 0.98], 1e-7)
    with pytest.raises(ConfigError, match="'sgd', 'adamw'"):
        load_config(None, ["optim.name=adam"])


def test_adamw_k1_engine_equals_plain_adamw_bitwise() -> None:
    """K=1 with AdamW is ordinary backprop with torch's AdamW, bit for bit (ViT, the recipe's model family)."""
    kw = dict(num_classes=CLASSES, width=32, heads=2, depth=2, patch_size=8, image_size=32)
    optim = OptimCfg(name="adamw", lr=1e-3, weight_decay=0.05)
    batches = [make_batch(32, seed=s) for s in range(3)]
    torch.manual_seed(0)
    model = create_model("vit_tiny", **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for b in batches:
        opt.zero_grad()
        F.cross_entropy(model(b.input), b.target).backward()
        opt.step()
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("vit_tiny", **kw), MethodCfg(name="dgl"), ClassificationTask(CLASSES), optim, split=SplitCfg(k=1)
    )
    for b in batches:
        engine.train_step(b)
    for (key, a), b in zip(model.state_dict().items(), engine.backbone.state_dict().values()):
        assert torch.equal(a, b), f"AdamW K=1 differs from plain AdamW at {key}"


def test_every_module_gets_an_adamw_and_trains() -> None:
    torch.manual_seed(0)
    backbone = create_model("vit_tiny", num_classes=CLASSES, width=32, heads=2, patch_size=8, image_size=32)
    optim = OptimCfg(name="adamw", lr=1e-3, weight_decay=0.05)
    engine = LocalEngine(
        backbone, MethodCfg(name="dgl"), ClassificationTask(CLASSES), optim, split=SplitCfg(k=4, preset="manpp")
    )
    assert len(engine._optimizers) == 4 and all(isinstance(o, torch.optim.AdamW) for o in engine._optimizers)
    before = [p.detach().clone() for p in engine.module_parameters(3)]
    for seed in range(2):
        result = engine.train_step(make_batch(32, seed=seed))
    assert all(math.isfinite(v) for v in result.losses())
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.module_parameters(3)))
    engine.set_lr(5e-4)
    assert engine.lr == 5e-4 and all(g["lr"] == 5e-4 for o in engine._optimizers for g in o.param_groups)


def test_imagenet_cosine_starts_at_lr0_per_epoch() -> None:
    """The ImageNet scripts set lr = ½·lr0·(1 + cos(π·epoch/E)) with epoch from 0; InfoPro's CIFAR scripts count
    from 1 (``first_epoch: 1``, the default, unchanged) (docs/configuration.md, "The papers' optimizer recipes")."""
    imagenet = OptimCfg(lr=0.4, per_step=False, first_epoch=0)
    assert [lr_at(imagenet, e, 5, 100, 90) for e in (0, 45)] == pytest.approx([0.4, 0.2])
    assert lr_at(imagenet, 89, 0, 100, 90) == pytest.approx(0.2 * (1 + math.cos(math.pi * 89 / 90)))
    cifar = OptimCfg(lr=0.4, per_step=False)
    assert lr_at(cifar, 0, 0, 100, 90) == pytest.approx(0.2 * (1 + math.cos(math.pi / 90)))
    blend = OptimCfg(lr=0.8, per_step=False, warmup_epochs=10, first_epoch=0)
    assert lr_at(blend, 0, 0, 100, 160) == pytest.approx(0.01)  # the warm-up blend still starts at warmup_lr


def test_step_schedule_drives_a_hand_written_loop_as_the_trainer_would() -> None:
    """Your own loop around train_step: StepSchedule sets lr_at's value before every step (cosine with warm-up
    here), so the lr is never silently the constant optim.lr; its state resumes the count."""
    cfg = OptimCfg(lr=0.1, warmup_epochs=1, warmup_lr=0.01)
    engine = LocalEngine(
        create_model("resnet8", num_classes=CLASSES, width=4),
        MethodCfg(name="dgl"),
        ClassificationTask(CLASSES),
        cfg,
        split=SplitCfg(k=2),
    )
    schedule = StepSchedule(cfg, steps_per_epoch=3, epochs=2)
    seen = []
    for _ in range(4):
        expected = schedule.step(engine)
        seen.append(engine.lr)
        assert engine.lr == expected
        engine.train_step(make_batch(16))
    assert seen == [lr_at(cfg, e, s, 3, 2) for e, s in ((0, 0), (0, 1), (0, 2), (1, 0))]
    assert len(set(seen)) == 4 and seen[0] == pytest.approx(0.01)
    resumed = StepSchedule(cfg, steps_per_epoch=3, epochs=2)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.step(engine) == lr_at(cfg, 1, 1, 3, 2)
    with pytest.raises(ValueError, match="steps_per_epoch >= 1"):
        StepSchedule(cfg, steps_per_epoch=0, epochs=2)
