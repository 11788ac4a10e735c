"""Reference-bug switches (``method.legacy``; docs/methods.md, "Legacy switches: reference-code behaviour"), MAN++
ViT's two-unit bridge and HPFF's decoder-only patch fusion: each reproduces the reference's behaviour exactly and
only when asked."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from locallearn import ClassificationTask, MethodCfg, create_model
from locallearn.local.losses import reconstruction_loss
from locallearn.methods.pff import PatchDecoders, patches
from locallearn.train.config import OptimCfg, SplitCfg
from locallearn.train.engine import LocalEngine

from .test_engine import make_batch, make_engine


def resnet32_engine(cfg: MethodCfg) -> LocalEngine:
    """ResNet-32 cut as MAN's K=16 (15 modules: the paper's label counts one more)."""
    torch.manual_seed(0)
    backbone = create_model("resnet32", num_classes=4, in_channels=1, width=4)
    return LocalEngine(backbone, cfg, ClassificationTask(4), OptimCfg(), split=SplitCfg(k=15, preset="man"))


def test_unknown_legacy_switch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown method.legacy switch 'stage_lamda'"):
        make_engine(MethodCfg(name="dgl", legacy=["stage_lamda"]), 3)


def test_stage_lambda_uses_next_stage_over_paper_label() -> None:
    """MAN's CIFAR code: r = s'/(K_label - 2); the label K=16 is 15 modules, so r <= 3/14."""
    lambdas = [5.0, 1.0, 0.0, 0.0]
    cfg = MethodCfg(name="infopro", addons=["man"], lambdas=lambdas, loss_mode="softmax")
    fixed = resnet32_engine(replace(cfg, lambdas=[5.0, 1.0, 0.0, 0.5]))  # (0, 0) at module 13 would be refused
    legacy = resnet32_engine(replace(cfg, legacy=["stage_lambda"]))
    for k in range(14):
        stage = legacy.backbone.infos[legacy.ends[k]].stage
        r_legacy, r_fixed = stage / 14, k / 13
        got = legacy.method.aux[k].independent.objective
        assert math.isclose(got.lam_x, 5 * (1 - r_legacy)) and math.isclose(got.lam_y, 1 - r_legacy)
        want = fixed.method.aux[k].independent.objective
        assert math.isclose(want.lam_x, 5 * (1 - r_fixed))
    assert legacy.method.aux[13].independent.objective.lam_x > 5 * (1 - 3 / 14) - 1e-9  # almost flat


def _ema_tensors(engine: LocalEngine, k: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.method.aux[k].cascade.bridge.ema.parameters()]


@pytest.mark.parametrize("legacy", [[], ["last_ema_only"]])
def test_last_ema_only_moves_only_the_last_splits_ema(legacy: list[str]) -> None:
    """MLAAN CIFAR updates only EMA_Net[-1] (MLAAN's ``resnetMLAAN.py``); the default updates every module's EMA."""
    cfg = MethodCfg(name="dgl", addons=["cascade", "lam"], legacy=legacy, ema_init="random")
    engine = make_engine(cfg, 4)
    before = [_ema_tensors(engine, k) for k in range(3)]
    engine.train_step(make_batch())
    moved = [any(not torch.equal(a, b) for a, b in zip(before[k], _ema_tensors(engine, k))) for k in range(3)]
    assert moved == ([False, False, True] if legacy else [True, True, True])


def test_final_overwrite_keeps_only_the_cascade_ce() -> None:
    """MLAAN CIFAR overwrites CE(x) with CE(y) (MLAAN's ``resnetMLAAN.py``); the default (paper intent) sums both."""
    batch = make_batch()
    for legacy, reaches in (([], [1, 2]), (["final_overwrite"], [2])):
        engine = make_engine(MethodCfg(name="dgl", addons=["cascade"], cascade_final="both", legacy=legacy), 3)
        h = torch.randn(len(batch), 4, requires_grad=True)
        assert [item.reach for item in engine.method.local_losses(2, h, batch)] == reaches


def test_triple_bn_momentum_equals_repeated_updates() -> None:
    """n train-mode forwards on the same input with momentum m == one with 1 - (1 - m)^n, the ``triple_bn`` rule
    (docs/methods.md, "Legacy switches: reference-code behaviour")."""
    x = torch.randn(8, 3, 5, 5)
    repeated, once = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    for _ in range(3):
        repeated(x)
    once.momentum = 1 - 0.9**3
    once(x)
    torch.testing.assert_close(repeated.running_mean, once.running_mean)
    torch.testing.assert_close(repeated.running_var, once.running_var)

    ends = SplitCfg(preset="ends", ends=[2, 3, 4, 5])
    engine = make_engine(MethodCfg(name="dgl", addons=["cascade"]), 4, split=ends)
    engine_legacy = make_engine(MethodCfg(name="dgl", addons=["cascade"], legacy=["triple_bn"]), 4, split=ends)
    runs = [1, 2, 3, 3, 2]  # stem once; modules [stem+l1.0] | l2.0 | l3.0 | head: 2, 3, 3, 2 reference forwards
    for unit, plain, n in zip(engine_legacy.backbone.units, engine.backbone.units, runs):
        for bn, ref in zip(unit.modules(), plain.modules()):
            if isinstance(bn, nn.BatchNorm2d):
                assert math.isclose(bn.momentum, 1 - (1 - ref.momentum) ** n)


def test_ema_before_backward_moves_ema_before_the_local_backward() -> None:
    """MAN++ ViT order (MAN++'s ``vit_man.py``, ``_ema_update``): the EMA moves inside the step, before its
    backward, and the backward then uses the moved weights; the default moves it after the backward."""
    base = MethodCfg(name="dgl", addons=["man"], bridge_combine="scaled", ema_init="random", ema_decay=0.5)
    default, legacy = make_engine(base, 3), make_engine(replace(base, legacy=["ema_before_backward"]), 3)
    ema0 = [p.detach().clone() for p in legacy.method.aux[0].independent.bridge.ema.parameters()]
    live = [p.detach().clone() for p in legacy.modules[1].parameters()]
    batch = make_batch()
    for engine in (default, legacy):
        engine.zero_grad(0)
        out = engine.modules[0](batch.input)
        losses = engine.method.local_losses(0, out, batch)
        sum(item.loss for item in losses).backward()
    moved = list(legacy.method.aux[0].independent.bridge.ema.parameters())
    for m, e, p in zip(moved, ema0, live):
        torch.testing.assert_close(m, e.lerp(p, 0.5))  # moved once, before the backward
    grads = [p.grad for p in legacy.modules[0].parameters()], [p.grad for p in default.modules[0].parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(*grads))  # the backward saw different EMA weights


def test_man_depth_two_chains_two_learnable_units_with_one_ema() -> None:
    """MAN++ ViT (MAN++'s ``vit_man.py``): y = s·LB0(h) + (2 - s)·EMA0(h), then LB1(y)."""
    torch.manual_seed(0)
    vit = create_model("vit_tiny", num_classes=4, in_channels=3, image_size=16, patch_size=4, depth=6, width=32)
    cfg = MethodCfg(name="dgl", addons=["man"], bridge_combine="scaled", man_depth=2)
    engine = LocalEngine(vit, cfg, ClassificationTask(4), OptimCfg(), split=3)
    bridge = engine.method.aux[0].independent.bridge
    assert bridge.sources == [engine.ends[0], engine.ends[0] + 1] and len(bridge.ema) == 1
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        bridge.scale.fill_(0.7)
        y = 0.7 * bridge.learnable[0](h) + 1.3 * bridge.ema[0](h)
        torch.testing.assert_close(bridge(h), bridge.learnable[1](y))


@pytest.mark.parametrize("size", [8, 7])
def test_pff_decoder_mode_patches_only_the_decoder(size: int) -> None:
    """HPFF's CIFAR ``network/auxiliary_net.py``: one decoder per patch, BCEs summed, the head on the whole map."""
    cfg = MethodCfg(name="infopro", addons=["pff"], pff_mode="decoder", loss_mode="softmax")
    engine = make_engine(cfg, 3)
    objective = engine.method.aux[0].independent
    assert isinstance(objective.decoder, PatchDecoders) and len(objective.decoder.decoders) == 4
    h = torch.randn(2, objective.decoder.decoders[0].net[0][0].in_channels, size, size)
    image = torch.rand(2, 1, 2 * size, 2 * size)
    recon = objective.decoder(h, image.shape[-2:])
    assert recon.shape == image.shape
    pieces = [dec(p, t.shape[-2:]) for dec, p, t in zip(objective.decoder.decoders, patches(h, 2), patches(image, 2))]
    for piece, got in zip(pieces, patches(recon, 2)):
        torch.testing.assert_close(got, piece)  # patch (i, j) of the map reconstructs patch (i, j) of the image
    want = sum(reconstruction_loss(r, t) for r, t in zip(pieces, patches(image, 2)))
    torch.testing.assert_close(objective.decoder.loss(recon, image), want)
    torch.testing.assert_close(objective.logits(h), objective.head(h))  # the head is not patched
    engine.train_step(make_batch())


def test_pff_decoder_mode_without_a_decoder_is_an_error() -> None:
    with pytest.raises(ValueError, match="pff_mode=paper"):
        make_engine(MethodCfg(name="dgl", addons=["pff"], pff_mode="decoder"), 3)
