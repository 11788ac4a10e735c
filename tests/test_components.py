"""Backbones, aux nets, losses and schedules against hand-written references and the reference code as described in
(docs/methods.md, "Datasets, backbones and presets of the papers"), (docs/methods.md, "Aux nets and local losses")
and (docs/configuration.md, "The papers' optimizer recipes")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locallearn import create_model
from locallearn.local.aux_nets import DGL_HEADS, INFOPRO_CONFIGS, Decoder, DGLHead, InfoProHead
from locallearn.local.losses import infopro_lambdas, supcon_loss
from locallearn.models.units import UnitInfo
from locallearn.train.config import OptimCfg
from locallearn.train.schedule import lr_at


@pytest.mark.parametrize("depth", [8, 14, 20, 32, 44, 56, 110])
def test_cifar_resnet_units_and_shapes(depth: int) -> None:
    n = (depth - 2) // 6
    model = create_model(f"resnet{depth}", num_classes=7, in_channels=1)
    assert len(model) == 3 * n + 2
    assert [i.name for i in model.infos][:2] == ["stem", "layer1.0"] and model.infos[-1].is_head
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 6 * n + 2  # stem, two per block, two projection shortcuts
    x = torch.randn(2, 1, 32, 32)
    sizes = []
    with torch.no_grad():
        for unit, info in zip(model.units[:-1], model.infos[:-1]):
            x = unit(x)
            assert x.shape[1] == info.channels and x.shape[-1] == 32 // info.reduction
            sizes.append(x.shape[-1])
        assert model.units[-1](x).shape == (2, 7)
    assert sorted(set(sizes)) == [8, 16, 32]  # stages at 32, 16, 8 (InfoPro's networks/resnet.py)


def test_cifar_resnet_init_and_bad_depth() -> None:
    torch.manual_seed(0)
    conv = create_model("resnet110").units[0][0]
    assert abs(conv.weight.std().item() - math.sqrt(2 / (9 * 16))) < 0.03
    with pytest.raises(ValueError, match="6n\\+2"):
        from locallearn.models.cifar_resnet import cifar_resnet

        cifar_resnet(30)


@pytest.mark.parametrize("config", INFOPRO_CONFIGS)
@pytest.mark.parametrize("unit", [0, 2, 5, 8])  # stem (16), layer1 (16), layer2 (32), layer3 (64) of ResNet-20
def test_infopro_heads_fit_every_split_point(config: str, unit: int) -> None:
    model = create_model("resnet20")
    info = model.infos[unit]
    head = InfoProHead(info, model.num_stages, config, out_dim=128, widen=2, feature_dim=32)
    h = torch.randn(3, info.channels, 32 // info.reduction, 32 // info.reduction)
    assert head(h).shape == (3, 128)
    if config[0] != "0":
        conv = head.net[0][0]
        expected = {16: (64, 2), 32: (128, 2), 64: (128, 1)}[info.channels]  # 16→32w s2, 32→64w s2, 64→64w s1
        assert (conv.out_channels, conv.stride[0]) == expected


def test_decoder_and_dgl_heads_any_batch_and_size() -> None:
    info = create_model("resnet20").infos[5]  # layer2.1: 32 channels at 16×16
    dec = Decoder(info, image_channels=3)
    for n, size in ((1, 28), (5, 32), (2, 96)):
        out = dec(torch.randn(n, 32, size // 2, size // 2), (size, size))
        assert out.shape == (n, 3, size, size) and out.min() >= 0 and out.max() <= 1
    for kind in DGL_HEADS:
        head = DGLHead(info, kind, num_classes=10)
        for n, s in ((2, 16), (3, 7)):
            assert head(torch.randn(n, 32, s, s)).shape == (n, 10)


def reference_supcon(z: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    """Khosla et al. eq. 2, one view, written as loops."""
    z = F.normalize(z, dim=1)
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denom = sum(torch.exp(z[i] @ z[a] / t) for a in others)
        pos = [p for p in others if y[p] == y[i]]
        if pos:
            total = total - sum(torch.log(torch.exp(z[i] @ z[p] / t) / denom) for p in pos) / len(pos)
    return total / len(z)


def test_supcon_matches_reference() -> None:
    torch.manual_seed(0)
    z = torch.randn(9, 5)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2])  # class 3 has no positive: contributes 0
    torch.testing.assert_close(supcon_loss(z, y, 0.5, 0.5), reference_supcon(z, y, 0.5), rtol=1e-5, atol=1e-5)


def test_initial_losses_are_near_ln10() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    assert abs(loss - math.log(10)) < 0.3


def test_lambda_schedule_spec_2_3() -> None:
    # ResNet-32 K=4 contrast: (ixx_1, ixy_1, ixx_2, ixy_2) = (6, 0, 1, 2); modules 0..2 are local
    assert infopro_lambdas(0, 4, 6, 0, 1, 2) == (6, 0)
    assert infopro_lambdas(1, 4, 6, 0, 1, 2) == (3.5, 1)
    assert infopro_lambdas(2, 4, 6, 0, 1, 2) == (1, 2)
    assert infopro_lambdas(0, 2, 5, 1, 0, 0) == (5, 1)  # K=2: r = 0
    with pytest.raises(ValueError):
        infopro_lambdas(3, 4, 6, 0, 1, 2)


def test_lr_schedules_spec_0_4() -> None:
    ref = OptimCfg(lr=0.8, schedule="cosine", warmup_epochs=10, warmup_lr=0.01, per_step=False)
    assert lr_at(ref, 0, 0, 49, 160) == pytest.approx(0.01)  # e = 1 starts at 0.01
    e = 11  # first epoch past the warm-up is on the cosine curve
    assert lr_at(ref, e - 1, 0, 49, 160) == pytest.approx(0.4 * (1 + math.cos(math.pi * e / 160)))
    e = 5
    cos = 0.4 * (1 + math.cos(math.pi * e / 160))
    assert lr_at(ref, e - 1, 7, 49, 160) == pytest.approx(cos * (e - 1) / 10 + 0.01 * (11 - e) / 10)
    step = OptimCfg(lr=0.1, schedule="step", milestones=[80, 120], gamma=0.1)
    assert [lr_at(step, e, 0, 10, 160) for e in (0, 79, 80, 120)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    smooth = OptimCfg(lr=0.1, schedule="cosine", per_step=True)
    lrs = [lr_at(smooth, e, s, 10, 3) for e in range(3) for s in range(10)]
    assert lrs[0] == pytest.approx(0.1) and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0


def test_decoder_at_the_image_size_keeps_no_second_copy_of_its_input() -> None:
    """A stage-1 map is already at the image's size: upsampling it would save a copy of the map beside the map
    itself (bilinear with align_corners at the same size is the identity, so skipping it changes no value)."""
    decoder = Decoder(UnitInfo("layer1.0", 16, 1, 1), image_channels=1)
    h = torch.randn(2, 16, 28, 28, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.detach())
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = decoder(h, (28, 28))
    maps = [t for t in saved if t.shape == h.shape]
    assert len(maps) == 1 and maps[0].untyped_storage()._cdata == h.untyped_storage()._cdata
    torch.testing.assert_close(
        out, decoder.net(F.interpolate(h, size=(28, 28), mode="bilinear", align_corners=True)), rtol=0, atol=0
    )
