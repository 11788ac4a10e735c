"""ImageNet ResNets and ViTs as ordered units: shapes per unit, aux heads at every split point, gradient isolation
of DGL and InfoPro at K=2/4, MAN++'s ViT K=4 split, and a few training steps (all tiny, on CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from locallearn import Batch, ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.local.aux_nets import DGLHead, InfoProHead, TokenHead
from locallearn.models import list_models
from locallearn.train.config import SplitCfg

from .test_engine import assert_gradient_isolation

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
VITS = ["vit_tiny", "vit_small", "vit_base"]
BLOCKS = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet101": 33, "resnet152": 50}
CLASSES = 4
METHODS = {
    "dgl": MethodCfg(name="dgl"),
    "infopro": MethodCfg(name="infopro", loss_mode="softmax", lambdas=[0.0, 1.0, 0.0, 1.0]),
}


def tiny(name: str):
    """A small instance of a registered backbone and its input size."""
    if name.startswith("vit"):
        kw = dict(width=32, heads=2, depth=4, patch_size=8, image_size=32)
        return create_model(name, num_classes=CLASSES, in_channels=3, **kw), 32
    return create_model(name, num_classes=CLASSES, in_channels=3, width=4), 64


def make_batch(size: int, n: int = 8, channels: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    x = ((raw.float() / 255 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
    return Batch(x, torch.arange(n) % CLASSES, raw)


def make_engine(name: str, cfg: MethodCfg, k: int, **method_kw) -> tuple[LocalEngine, int]:
    torch.manual_seed(0)
    backbone, size = tiny(name)
    method = MethodCfg(**{**cfg.__dict__, **method_kw})
    return LocalEngine(backbone, method, ClassificationTask(CLASSES), OptimCfg(lr=0.01), split=k), size


def test_registered_without_clashing_with_cifar_resnets() -> None:
    names = set(list_models())
    assert set(RESNETS + VITS) <= names
    assert {"resnet8", "resnet20", "resnet32", "resnet110"} <= names


@pytest.mark.parametrize("name", RESNETS + VITS)
def test_unit_outputs_match_unit_infos(name: str) -> None:
    model, size = tiny(name)
    model.eval()
    x = torch.randn(2, 3, size, size)
    is_vit = name.startswith("vit")
    assert len(model) == (4 + 2 if is_vit else BLOCKS[name] + 2)
    assert model.infos[-1].is_head and not any(i.is_head for i in model.infos[:-1])
    with torch.no_grad():
        for unit, info in zip(model.units, model.infos):
            x = unit(x)
            if info.is_head:
                assert x.shape == (2, CLASSES) and info.channels == CLASSES
            elif is_vit:
                assert info.tokens and x.shape == (2, (size // info.reduction) ** 2 + 1, info.channels)
            else:
                assert not info.tokens and x.shape == (2, info.channels, size // info.reduction, size // info.reduction)
    if not is_vit:
        assert [i.stage for i in model.infos[:-1]] == sorted(
            i.stage for i in model.infos[:-1]
        ) and model.num_stages == 4


@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_full_size_resnets_have_the_reference_parameter_count(name: str, params: int) -> None:
    model = create_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.infos[-2].channels == (512 if name == "resnet18" else 2048)


def test_vit_variants_and_any_input_size() -> None:
    for name, width, heads in (("vit_tiny", 192, 3), ("vit_small", 384, 6), ("vit_base", 768, 12)):
        model = create_model(name, num_classes=10, depth=1)
        assert model.infos[1].channels == width and model.units[1].attn.heads == heads
        assert model.units[0].pos_embed.shape == (1, 14 * 14 + 1, width)
    model, _ = tiny("vit_small")
    assert model(torch.randn(2, 3, 48, 40)).shape == (2, CLASSES)  # position embedding resized to 6×5
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(2, 3, 30, 32))


def test_zero_init_residual_starts_blocks_at_identity_branch() -> None:
    for name, attr in (("resnet18", "bn2"), ("resnet50", "bn3")):
        model = create_model(name, width=4, zero_init_residual=True)
        bns = [getattr(u, attr).weight for u in model.units[1:-1]]
        assert bns and all(not w.any() for w in bns)


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_aux_heads_fit_every_split_point(name: str) -> None:
    """224×224 input: maps from 56×56 down to 7×7, widths of every stage (Bottleneck ×4), stem included."""
    model = create_model(name, num_classes=CLASSES, width=4)
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for unit, info in zip(model.units[:-1], model.infos[:-1]):
            x = unit(x)
            assert x.shape[-1] == 224 // info.reduction
            heads = [InfoProHead(info, model.num_stages, aux, 16, feature_dim=8) for aux in ("1c2f", "2c2f")]
            heads += [DGLHead(info, kind, CLASSES) for kind in ("mlp-sr", "cnn")]
            for head in heads:
                head.eval()
                assert head(x).shape[0] == 2


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", RESNETS + VITS)
def test_local_loss_reaches_only_its_module(name: str, method: str, k: int) -> None:
    engine, size = make_engine(name, METHODS[method], k)
    assert engine.k == k
    assert_gradient_isolation(engine, make_batch(size))
    if name.startswith("vit"):
        heads = [a.independent.head for a in engine.method.aux[:-1]]
        assert all(isinstance(head, TokenHead) for head in heads)
        # A module holding only the patch embedding: its CLS token has seen no patch, so the head mean-pools.
        assert [head.pool for head in heads] == ["mean" if e == 1 else "cls" for e in engine.ends[:-1]]


@pytest.mark.parametrize("name", RESNETS + VITS)
def test_a_few_training_steps_have_finite_losses(name: str) -> None:
    for method, k in (("dgl", 4), ("infopro", 2)):
        engine, size = make_engine(name, METHODS[method], k)
        for seed in range(2):
            losses = engine.train_step(make_batch(size, seed=seed)).losses()
        assert len(losses) == k and all(math.isfinite(float(v)) for v in losses), (method, losses)


def test_vit_k4_split_is_four_groups_of_three_blocks() -> None:
    """MAN++'s split: patch embed + blocks 0-2 | 3-5 | 6-8 | 9-11 + head. ``balance: params`` gives it; ``units``
    (14 equal costs) does not."""
    torch.manual_seed(0)
    backbone = create_model("vit_tiny", num_classes=CLASSES, width=32, heads=2, patch_size=8, image_size=32)
    task, optim = ClassificationTask(CLASSES), OptimCfg()
    engine = LocalEngine(backbone, MethodCfg(name="dgl"), task, optim, split=SplitCfg(k=4, balance="params"))
    assert engine.ends == [4, 7, 10, 14]
    assert LocalEngine(backbone, MethodCfg(name="dgl"), task, optim, split=SplitCfg(k=4)).ends != [4, 7, 10, 14]


def test_infopro_on_tokens_needs_zero_reconstruction_weight() -> None:
    with pytest.raises(ValueError, match=r"method.lambdas=\[0, ixy_1, 0, ixy_2\]"):
        make_engine("vit_small", MethodCfg(name="infopro"), 2)
    engine, size = make_engine("vit_small", MethodCfg(name="infopro", loss_mode="contrast", lambdas=[0, 1, 0, 1]), 3)
    assert all(math.isfinite(float(v)) for v in engine.train_step(make_batch(size)).losses())


def test_model_patch_size_builds_a_vit_for_the_dataset_images() -> None:
    """``model.patch_size`` gives CIFAR ViTs (patch 4 on 32×32: 64 tokens + CLS); a patch that does not tile the
    image, or a patch size for a backbone without patches, is a one-line ConfigError."""
    from locallearn.data.datasets import dataset_spec
    from locallearn.train.build import build_engine
    from locallearn.train.config import ConfigError, load_config

    def engine(*overrides: str) -> LocalEngine:
        cfg = load_config(None, ["model.name=vit_tiny", "model.width=64", "method.name=dgl", "split.k=2", *overrides])
        spec = dataset_spec(cfg.data.name)
        return build_engine(cfg, spec, torch.device("cpu"), torch.zeros(2, spec.channels, spec.size, spec.size))

    tokens = engine("data.name=cifar10", "model.patch_size=4").modules[0](torch.zeros(2, 3, 32, 32))
    assert tokens.shape == (2, 8 * 8 + 1, 64)
    with pytest.raises(ConfigError, match="multiple of patch_size 5"):
        engine("data.name=fashion_mnist", "model.patch_size=5")
    with pytest.raises(ConfigError, match="patch_size"):
        engine("model.name=resnet20", "model.width=16", "model.patch_size=4")
