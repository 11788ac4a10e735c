"""The aux nets are built and initialised as the authors' code builds them (docs/methods.md, "Aux-net
initialisation" and "Aux nets and local losses"): InfoPro's and DGL's ImageNet code create their aux nets inside the
network, so the network's conv init reaches the aux convs too; DGL's ``cnn`` head normalises the pooled 2×2 map per
channel; InfoPro's decoder convs carry a bias."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from locallearn import Batch, ClassificationTask, LocalEngine, MethodCfg, OptimCfg, UnitBackbone, create_model
from locallearn.local.aux_nets import Decoder, DGLHead
from locallearn.models.units import UnitInfo
from locallearn.train.config import SplitCfg


def aux_convs(engine: LocalEngine) -> list[nn.Conv2d]:
    return [m for m in engine.method.modules() if isinstance(m, nn.Conv2d)]


def fan_out_std(conv: nn.Conv2d) -> float:
    return math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))


def assert_fan_out_normal(convs: list[nn.Conv2d]) -> None:
    """Every weight is N(0, 2 / (k·k·out)): each large conv's std within 10 % of the formula, and all weights
    together, scaled by it, have mean 0 and std 1 within four standard errors (torch's default init gives
    0.17-0.58 of that std on these nets)."""
    assert convs
    z = torch.cat([(c.weight.detach() / fan_out_std(c)).flatten() for c in convs])
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n) and abs(z.std().item() - 1) < 4 / math.sqrt(2 * n)
    for conv in convs:
        if conv.weight.numel() >= 500:
            assert abs(conv.weight.std().item() / fan_out_std(conv) - 1) < 0.1, conv


def test_infopro_aux_convs_get_infopro_resnet_init() -> None:
    """ResNet-32 K=8 with InfoPro's split: the 21 aux convs (each local module's decoder has two, its head one)
    drawn as the reference's ``InfoProResNet`` init loop draws them; BatchNorms at γ=1, β=0."""
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("resnet32"),
        MethodCfg(name="infopro"),
        ClassificationTask(10),
        OptimCfg(),
        split=SplitCfg(k=8, preset="infopro"),
    )
    convs = aux_convs(engine)
    assert len(convs) == 7 * 3  # per local module: the decoder's two convs and the head's one
    assert_fan_out_normal(convs)
    for bn in (m for m in engine.method.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bool((bn.weight == 1).all()) and bool((bn.bias == 0).all())


def test_aux_init_torch_keeps_torch_defaults_on_any_backbone() -> None:
    """``method.aux_init: torch``: the aux convs keep torch's default (kaiming-uniform, a = √5: std 1/√(3·fan_in)),
    the init this library used before it followed the reference."""
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("resnet32"),
        MethodCfg(name="infopro", aux_init="torch"),
        ClassificationTask(10),
        OptimCfg(),
        split=SplitCfg(k=8, preset="infopro"),
    )
    large = [c for c in aux_convs(engine) if c.weight.numel() >= 500]
    assert large
    for conv in large:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() * math.sqrt(3 * fan_in) - 1) < 0.1


def test_dgl_aux_convs_on_an_imagenet_resnet_get_its_kaiming_fan_out_init() -> None:
    """DGL's ImageNet ``ResNet`` runs its kaiming (fan_out) loop over its aux nets as well."""
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("resnet18", num_classes=10, width=16),
        MethodCfg(name="dgl", dgl_head="mlp-sr"),
        ClassificationTask(10),
        OptimCfg(),
        split=2,
    )
    assert_fan_out_normal(aux_convs(engine))


def test_aux_nets_on_a_model_without_its_own_init_keep_torch_defaults() -> None:
    """A user's model declares no init, so the aux convs keep torch's default (kaiming-uniform, a = √5: std
    1/√(3·fan_in)), whatever the method."""
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Conv2d(cin, 32, 3, padding=1), nn.ReLU()) for cin in (3, 32)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    backbone = UnitBackbone.from_sequential([*layers, head], (3, 16, 16))
    assert backbone.weight_init is None
    engine = LocalEngine(backbone, MethodCfg(name="infopro"), ClassificationTask(10), OptimCfg(), split=2)
    for conv in aux_convs(engine):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        if conv.weight.numel() >= 500:
            assert abs(conv.weight.std().item() * math.sqrt(3 * fan_in) - 1) < 0.1


def test_dgl_cnn_head_is_the_reference_layout() -> None:
    """``cnn``: two 3×3 conv-BN-ReLU at the input width, 2×2 average pool, BatchNorm2d(C) on that map, flatten,
    Linear(4C → classes); no MLP and no pre-pool."""
    c, classes = 8, 5
    head = DGLHead(UnitInfo("layer2.0", c, 2, 2), "cnn", classes)
    assert [type(m) for m in head.convs[0]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] and len(head.convs) == 2
    assert all(s[0].kernel_size == (3, 3) and s[0].bias is None for s in head.convs)
    assert isinstance(head.norm, nn.BatchNorm2d) and head.norm.num_features == c
    assert [type(m) for m in head.mlp] == [nn.Linear] and head.mlp[0].in_features == 4 * c
    reference_count = 2 * (9 * c * c + 2 * c) + 2 * c + (4 * c * classes + classes)
    assert sum(p.numel() for p in head.parameters()) == reference_count
    head.train()
    h = torch.randn(6, c, 7, 7)
    pooled = nn.functional.adaptive_avg_pool2d(head.convs(h), 2)
    mean, var = pooled.mean((0, 2, 3), keepdim=True), pooled.var((0, 2, 3), unbiased=False, keepdim=True)
    want = head.mlp[0](torch.flatten((pooled - mean) / torch.sqrt(var + head.norm.eps), 1))
    torch.testing.assert_close(head(h), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "mlp-sr"])
def test_dgl_mlp_heads_have_no_spatial_norm(kind: str) -> None:
    head = DGLHead(UnitInfo("layer2.0", 8, 2, 2), kind, 5)
    assert isinstance(head.norm, nn.Identity)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 3 + [nn.Linear]


def test_infopro_decoders_have_the_reference_biases_and_parameter_counts() -> None:
    """InfoPro's CIFAR decoder: 3×3 C→12 (bias), BN, ReLU, 3×3 12→channels (bias); its ImageNet decoder has a bias
    on every conv as well."""
    c = 32
    cifar = Decoder(UnitInfo("layer2.0", c, 2, 2), image_channels=3)
    convs = [m for m in cifar.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is not None for conv in convs)
    assert sum(p.numel() for p in cifar.parameters()) == (9 * c * 12 + 12) + 2 * 12 + (9 * 12 * 3 + 3)
    imagenet = Decoder(UnitInfo("layer2.0", 512, 2, 8), image_channels=3, kind="imagenet")
    assert all(m.bias is not None for m in imagenet.modules() if isinstance(m, nn.Conv2d))


def test_randomly_initialised_bridge_copies_get_the_networks_init() -> None:
    """``ema_init: random`` redraws the MAN copies as the reference's init loop does (its copies are built before
    that loop runs), not with torch's defaults, and away from the live units they copy."""
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("resnet32"),
        MethodCfg(name="dgl", addons=["man"], ema_init="random"),
        ClassificationTask(10),
        OptimCfg(),
        split=SplitCfg(k=8, preset="infopro"),
    )
    bridges = [aux.independent.bridge for aux in engine.method.aux[:-1]]
    copies = [m for b in bridges for part in (*b.learnable, *b.ema) for m in part.modules() if isinstance(m, nn.Conv2d)]
    sources = [m for b in bridges for i in b.sources for m in engine.backbone.units[i].modules()]
    assert len(copies) == 2 * sum(isinstance(m, nn.Conv2d) for m in sources) >= 28  # a learnable and an EMA copy
    assert_fan_out_normal(copies)
    live = bridges[0].live[0].conv1.weight
    assert not torch.equal(bridges[0].learnable[0].conv1.weight, live)


def test_a_module_whose_only_loss_has_zero_weights_is_refused_and_the_man_presets_train_every_module() -> None:
    """MAN's λ (5, 0.5, 0, 0) under the linear ratio give module K-2 the weights (0, 0): it would never train, so
    building it is an error; MAN's own stage ratio (``legacy: [stage_lambda]``, as the MAN presets set) trains
    every module."""
    cfg = MethodCfg(name="infopro", aux="2c2f", loss_mode="softmax", lambdas=[5.0, 0.5, 0.0, 0.0], addons=["man"])
    with pytest.raises(ValueError, match="local module 6 of 8 the weights \\(0, 0\\), so it would never train"):
        LocalEngine(create_model("resnet32"), cfg, ClassificationTask(10), OptimCfg(), split=SplitCfg(8, "infopro"))
    cfg.legacy = ["stage_lambda"]
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("resnet32"), cfg, ClassificationTask(10), OptimCfg(lr=0.1), split=SplitCfg(8, "infopro")
    )
    before = [[p.detach().clone() for p in engine.module_parameters(k)] for k in range(engine.k)]
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    engine.train_step(Batch(x, y, (x * 40 + 128).clamp(0, 255).to(torch.uint8)))
    for k in range(engine.k):
        assert any(not torch.equal(a, p) for a, p in zip(before[k], engine.module_parameters(k))), k
