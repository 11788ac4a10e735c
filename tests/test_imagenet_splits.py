"""Split presets on ImageNet ResNets and ViTs (docs/methods.md, "Where the paper presets come from"), and aux nets
at every split point.

Every ImageNet ResNet (18..152) and the 12-block ViT at every preset K it has, plus a few automatic K: the modules
chain to the right output shape, each local loss reaches only its module (gradient isolation), and a few training
steps give finite losses. The ImageNet aux pair (``method.aux: imagenet``: progressive decoder and 2048-wide head;
docs/methods.md, "Aux nets and local losses") is checked at every preset split point with K <= 8. Tiny networks:
ResNets of width 4 on 64 px inputs (maps from 16×16 down to 2×2), ViTs of width 32 with 8 px patches on 32 px
inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.local.aux_nets import Decoder, InfoProHead
from locallearn.local.split import backbone_layout, preset_split, presets_for
from locallearn.models.units import UnitBackbone, UnitInfo
from locallearn.train.config import SplitCfg

from .test_backbones import CLASSES, make_batch
from .test_engine import assert_gradient_isolation

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
VIT = "vit_tiny"


def tiny(name: str) -> tuple[UnitBackbone, int]:
    torch.manual_seed(0)
    if name.startswith("vit"):  # depth 12: the layout the ViT preset is defined for
        return create_model(name, num_classes=CLASSES, width=32, heads=2, patch_size=8, image_size=32), 32
    return create_model(name, num_classes=CLASSES, width=4), 64


def preset_cases() -> list[tuple[str, str, int]]:
    cases = []
    for name in [*RESNETS, VIT]:
        layout = backbone_layout(tiny(name)[0].infos)
        cases += [(name, preset, k) for preset, ks in presets_for(layout).items() for k in ks]
    return cases


PRESET_CASES = preset_cases()
AUTO_CASES = [(name, "auto", k) for name in [*RESNETS, VIT] for k in (3, 6)]


def engine_for(model: str, split: str, k: int, **method: object) -> tuple[LocalEngine, int]:
    backbone, size = tiny(model)
    cfg = MethodCfg(**{"name": "dgl", **method})
    optim = OptimCfg(lr=0.01)
    return LocalEngine(backbone, cfg, ClassificationTask(CLASSES), optim, split=SplitCfg(k=k, preset=split)), size


def test_every_family_has_its_presets() -> None:
    found = {(name, preset, k) for name, preset, k in PRESET_CASES}
    assert {("resnet101", "infopro_star", 2), ("resnet152", "infopro_star", 2)} <= found  # InfoPro*
    assert {("resnet101", "man", 4), ("resnet152", "man", 4), ("resnet101", "man", 2)} <= found  # MAN, MAN++
    assert {("resnet101", "hpff", 8), ("resnet152", "hpff", 4), ("resnet34", "hpff", 4)} <= found  # HPFF
    assert {("resnet34", "mlaan", 16), ("resnet101", "mlaan", 33), (VIT, "manpp", 4)} <= found  # MLAAN, MAN++ ViT
    assert not [case for case in PRESET_CASES if case[0] == "resnet18"]  # none in the papers: auto only
    with pytest.raises(ValueError, match=r"exists only for .*presets for ResNet-18: none.*split.preset=auto"):
        engine_for("resnet18", "man", 2)
    with pytest.raises(ValueError, match=r"has K in \[2, 4\], not 8"):
        engine_for("resnet101", "man", 8)
    with pytest.raises(ValueError, match=r"presets for ResNet-34/50: hpff \(K \[4\]\), mlaan \(K \[16\]\)"):
        engine_for("resnet50", "infopro_star", 2)


@pytest.mark.parametrize("case", PRESET_CASES + AUTO_CASES, ids=lambda c: "-".join(map(str, c)))
def test_split_chains_isolates_and_trains(case: tuple[str, str, int]) -> None:
    name, split, k = case
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the presets' K are true module counts: no label warning
        engine, size = engine_for(name, split, k)
    assert engine.k == k and engine.ends[-1] == len(engine.backbone)
    if split != "auto":
        assert engine.ends == preset_split(split, backbone_layout(engine.backbone.infos), k)
    batch = make_batch(size, n=4)
    h = batch.input
    with torch.no_grad():
        for module in engine.modules:
            h = module(h)
    assert h.shape == (4, CLASSES)
    assert_gradient_isolation(engine, batch)
    for seed in range(2):
        losses = engine.train_step(make_batch(size, n=4, seed=seed)).losses()
    assert len(losses) == k and all(math.isfinite(v) for v in losses), losses


IMAGENET_AUX_CASES = [case for case in PRESET_CASES if case[2] <= 8 and not case[0].startswith("vit")]


@pytest.mark.parametrize("case", IMAGENET_AUX_CASES, ids=lambda c: "-".join(map(str, c)))
def test_imagenet_aux_pair_fits_every_preset_point(case: tuple[str, str, int]) -> None:
    """InfoPro with the ImageNet decoder and head at each split: the reference only handles a
    512-channel 28×28 map (ResNet-101/152 layer2); here stem..layer4 widths and 16×16..2×2 maps all work."""
    name, split, k = case
    engine, size = engine_for(
        name, split, k, name="infopro", aux="imagenet", loss_mode="softmax", lambdas=[5.0, 0.75, 5.0, 0.75]
    )
    decoders = [aux.independent.decoder for aux in engine.method.aux[:-1]]
    assert all(d is not None and d.kind == "imagenet" for d in decoders)
    assert_gradient_isolation(engine, make_batch(size, n=4))
    assert all(math.isfinite(v) for v in engine.train_step(make_batch(size, n=4, seed=1)).losses())


def test_mlaan_paper_label_warns_and_maps_to_the_true_count() -> None:
    layout = backbone_layout(tiny("resnet101")[0].infos)
    with pytest.warns(UserWarning, match="label K=34 is 33"):
        ends = preset_split("mlaan", layout, 34)
    assert len(ends) == 33 and ends[0] == 2  # the stem is merged into the first block's module


def test_vit_preset_is_four_groups_of_three_blocks() -> None:
    engine, _ = engine_for(VIT, "manpp", 4)
    assert engine.ends == [4, 7, 10, 14]
    names = [engine.backbone.infos[e - 1].name for e in engine.ends]
    assert names == ["blocks.2", "blocks.5", "blocks.8", "head"]
    with pytest.raises(ValueError, match=r"exists only for"):  # a 4-block ViT has no preset
        LocalEngine(
            create_model(VIT, width=32, depth=4),
            MethodCfg(name="dgl"),
            ClassificationTask(CLASSES),
            OptimCfg(),
            split=SplitCfg(k=4, preset="manpp"),
        )


def test_imagenet_aux_pair_on_the_reference_map_is_the_reference_architecture() -> None:
    """On ResNet-101's layer2 output (512 channels, 28×28 of a 224 image) the decoder is 1×1 512→128, 3×3 →32,
    3×3 →12, each followed by a ×2 upsampling (56, 112, 224), then 3×3 →3 and a sigmoid; the head is 1×1 →128,
    3×3/2 →256, 3×3/2 →512, 1×1 →2048, GAP, Linear 2048→classes, as in InfoPro's ``Experiments on ImageNet``.
    Wider inputs start the head at 256."""
    info = UnitInfo("layer2.0", 512, 2, 8)
    decoder = Decoder(info, 3, kind="imagenet")
    convs = [(s[0].in_channels, s[0].out_channels, s[0].kernel_size[0]) for s in decoder.stages]
    assert convs == [(512, 128, 1), (128, 32, 3), (32, 12, 3)]
    assert (decoder.out[0].in_channels, decoder.out[0].out_channels) == (12, 3)
    with torch.no_grad():
        out = decoder(torch.randn(1, 512, 28, 28), (224, 224))
    assert out.shape == (1, 3, 224, 224) and float(out.min()) >= 0 and float(out.max()) <= 1
    head = InfoProHead(info, 4, "imagenet", 1000)
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0])
        for m in head.modules()
        if isinstance(m, nn.Conv2d)
    ]
    assert convs == [(512, 128, 1, 1), (128, 256, 3, 2), (256, 512, 3, 2), (512, 2048, 1, 1)]
    assert head.net[-1].in_features == 2048 and head(torch.randn(2, 512, 28, 28)).shape == (2, 1000)
    wide = InfoProHead(UnitInfo("layer3.0", 1024, 3, 16), 4, "imagenet", 10)
    assert next(m for m in wide.modules() if isinstance(m, nn.Conv2d)).out_channels == 256
    deep = Decoder(UnitInfo("layer4.2", 2048, 4, 32), 3, kind="imagenet")  # ×32: five ×2 steps
    assert [s[0].out_channels for s in deep.stages] == [128, 32, 32, 32, 12]
    with pytest.raises(ValueError, match="unknown InfoPro aux config 'imagenet'"):  # no token decoder or conv head
        engine_for(VIT, "manpp", 4, name="infopro", aux="imagenet", lambdas=[0.0, 1.0, 0.0, 1.0])
