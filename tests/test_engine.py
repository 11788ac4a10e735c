"""The engine's core promises: gradient isolation, K=1 ≡ plain end-to-end training, determinism, and that the
two optimizer step modes agree."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from locallearn import Batch, ClassificationTask, LocalEngine, MethodCfg, OptimCfg, UnitBackbone, create_model
from locallearn.train.config import SplitCfg

from .conftest import assert_grads_of_isolated_losses

METHODS = [
    MethodCfg(name="dgl", dgl_head="mlp-sr"),
    MethodCfg(name="dgl", dgl_head="cnn"),
    MethodCfg(name="infopro", loss_mode="contrast"),
    MethodCfg(name="infopro", loss_mode="softmax", aux="2c2f"),
]


def make_batch(n: int = 16, channels: int = 1, size: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    x = ((raw.float() / 255 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
    y = torch.arange(n) % 4  # every class has positives, so SupCon has a gradient everywhere
    return Batch(x, y, raw)


def make_engine(
    cfg: MethodCfg, k: int, seed: int = 0, step: str | None = None, split: SplitCfg | str = "auto", **kw
) -> LocalEngine:
    """A ResNet-8 engine with K=k (``split``: a preset name, or a SplitCfg whose k is replaced by ``k``)."""
    torch.manual_seed(seed)
    backbone = create_model("resnet8", num_classes=4, in_channels=1, width=4)
    method = MethodCfg(**{**cfg.__dict__, "step": step or cfg.step})
    split = SplitCfg(k=k, preset=split) if isinstance(split, str) else replace(split, k=k)
    return LocalEngine(backbone, method, ClassificationTask(4), OptimCfg(lr=0.05), split=split, **kw)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: f"{c.name}-{c.loss_mode}-{c.dgl_head}-{c.aux}")
def test_local_loss_reaches_only_its_module(cfg: MethodCfg, k: int) -> None:
    engine = make_engine(cfg, k)
    assert_gradient_isolation(engine, make_batch())


def assert_gradient_isolation(engine: LocalEngine, batch: Batch) -> None:
    """Each local loss gives every parameter of its module and aux net a non-zero gradient and none elsewhere."""
    engine.backbone.train()
    engine.method.train()
    groups = [engine.module_parameters(j) for j in range(engine.k)]
    every = [p for g in groups for p in g]
    owner = [i for i, g in enumerate(groups) for _ in g]
    h = batch.input
    for j, module in enumerate(engine.modules):
        out = module(h)
        loss = engine.method.local_loss(j, out, batch)
        grads = torch.autograd.grad(loss, every, allow_unused=True)
        for i, p, g in zip(owner, every, grads):
            if i == j:
                assert g is not None and g.abs().sum() > 0, f"module {j}: a parameter {tuple(p.shape)} got no gradient"
            else:
                assert g is None or not g.any(), f"loss {j} leaked a gradient into module {i}"
        h = out.detach()


@pytest.mark.parametrize("cfg", METHODS[::2], ids=lambda c: c.name)
def test_engine_detaches_and_matches_isolated_gradients(cfg: MethodCfg) -> None:
    """The engine's accumulated gradients equal those of each local loss taken alone, and no module after the
    first receives an input that requires grad (nothing flows back across a boundary)."""
    engine = make_engine(cfg, 3, step="end")
    reference = copy.deepcopy(engine)
    batch = make_batch()
    seen = []
    for module in engine.modules:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    engine.set_lr(0.0)  # step with lr 0 leaves params in place (momentum buffers start at 0), grads stay
    engine.train_step(batch)
    assert seen[1:] == [False] * (len(seen) - 1)
    assert_grads_of_isolated_losses(engine, reference, batch)


def test_k1_equals_plain_end_to_end_bitwise() -> None:
    """K=1 (any method) is ordinary backprop: same parameters as a hand-written PyTorch loop, bit for bit."""
    batches = [make_batch(seed=s) for s in range(4)]
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4, in_channels=1, width=4).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for b in batches:
        opt.zero_grad()
        F.cross_entropy(model(b.input), b.target).backward()
        opt.step()
    for name in ("e2e", "dgl", "infopro"):
        engine = make_engine(MethodCfg(name=name), 1)
        for b in batches:
            engine.train_step(b)
        for (key, a), b in zip(model.state_dict().items(), engine.backbone.state_dict().values()):
            assert torch.equal(a, b), f"{name} K=1 differs from plain backprop at {key}"


def test_same_seed_same_run_and_step_modes_agree() -> None:
    batches = [make_batch(seed=s) for s in range(3)]
    states = []
    for step in ("module", "end", "module"):
        engine = make_engine(MethodCfg(name="dgl"), 3, step=step)
        for b in batches:
            engine.train_step(b)
        states.append({**engine.backbone.state_dict(), **engine.method.state_dict()})
    for other in states[1:]:
        assert all(torch.equal(states[0][key], other[key]) for key in states[0])


def test_aux_seed_does_not_change_backbone_init() -> None:
    a = make_engine(MethodCfg(name="dgl"), 3, aux_seed=1)
    b = make_engine(MethodCfg(name="infopro"), 4, aux_seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.backbone.state_dict().values(), b.backbone.state_dict().values()))
    c = make_engine(MethodCfg(name="dgl"), 3, aux_seed=2)
    assert not all(torch.equal(x, y) for x, y in zip(a.method.state_dict().values(), c.method.state_dict().values()))


def test_any_batch_size_and_user_sequential_model() -> None:
    """A user's own nn.Sequential trains with every method, at batch sizes 2 and 5 (decoder, SupCon, BN)."""
    layers = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)),
    )
    for name in ("dgl", "infopro"):
        backbone = UnitBackbone.from_sequential(copy.deepcopy(layers), input_shape=(1, 16, 16))
        assert [i.channels for i in backbone.infos] == [8, 16, 16, 4]
        engine = LocalEngine(backbone, MethodCfg(name=name), ClassificationTask(4), OptimCfg(), split=SplitCfg(k=3))
        for n in (2, 5):
            engine.train_step(make_batch(n=n))
        assert engine.k == 3


def test_bad_method_requests_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="split.k=1"):
        make_engine(MethodCfg(name="e2e"), 3)
    with pytest.raises(ValueError, match="more modules than the model has units"):
        make_engine(MethodCfg(name="dgl"), 6)
    with pytest.raises(ValueError, match=">= 1"):
        make_engine(MethodCfg(name="dgl"), 0)
    with pytest.raises(ValueError, match="unknown method 'dg'; did you mean 'dgl'"):
        make_engine(MethodCfg(name="dg"), 2)
    with pytest.raises(ValueError, match="unknown split preset"):
        make_engine(MethodCfg(name="dgl"), 2, split="infopr")
    with pytest.raises(ValueError, match="only for ResNet"):
        make_engine(MethodCfg(name="dgl"), 2, split="infopro")  # preset exists for ResNet-32/110, not ResNet-8
    with pytest.raises(ValueError, match="aux config"):
        make_engine(MethodCfg(name="infopro", aux="3c1f"), 2)
    with pytest.raises(ValueError, match="DGL head"):
        make_engine(MethodCfg(name="dgl", dgl_head="mlp-xl"), 2)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_tracks_fp32(amp: str) -> None:
    """bf16/fp16 autocast (fp16 with one GradScaler for all K losses) stays within a tolerance of fp32."""
    batches = [make_batch(n=32, seed=s) for s in range(3)]
    runs = {}
    for mode in ("fp32", amp):
        engine = make_engine(MethodCfg(name="dgl"), 3, precision=mode)
        sums = sum(engine.train_step(b).figures for b in batches)
        runs[mode] = ((sums[:-2] / len(batches)).tolist(), engine.backbone.state_dict())
    for a, b in zip(runs["fp32"][0], runs[amp][0]):
        assert abs(a - b) < 0.05 * abs(a) + 0.02
    ref = torch.cat([v.flatten() for k, v in runs["fp32"][1].items() if v.is_floating_point()])
    low = torch.cat([v.flatten() for k, v in runs[amp][1].items() if v.is_floating_point()])
    assert (low - ref).norm() < 0.05 * ref.norm()


@pytest.mark.slow
def test_compile_in_place_keeps_checkpoint_keys() -> None:
    engine = make_engine(MethodCfg(name="dgl"), 2, compile=True)
    engine.train_step(make_batch())
    assert not any("_orig_mod" in key for key in engine.state_dict()["model"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "cfg",
    [
        MethodCfg(name="e2e"),
        MethodCfg(name="dgl"),
        MethodCfg(name="infopro"),
        MethodCfg(name="dgl", addons=["man"], bridge_combine="scaled"),
        MethodCfg(name="infopro", addons=["cascade", "pff"], cascade_final="both"),
        MethodCfg(name="dgl", addons=["cascade", "lam"], cascade_final="both", ema_warmup=True),
        MethodCfg(name="dgl", checkpoint=2),
    ],
    ids=["e2e", "dgl", "infopro", "dgl+manpp", "infopro+hpff", "dgl+mlaan", "dgl+ckpt"],
)
def test_every_method_and_addon_trains_under_mixed_precision(cfg: MethodCfg, precision: str) -> None:
    """``run.precision`` reaches every module, aux net and add-on: the autocast forward runs in the low dtype,
    parameters stay fp32, the first step's losses (same weights) are close to fp32's, and later ones stay finite.
    (Only the first step compares: fp16's GradScaler skips its first steps while it finds its scale.)"""
    k = 1 if cfg.name == "e2e" else 3
    engines = {p: make_engine(cfg, k, precision=p) for p in ("fp32", precision)}
    seen: set[torch.dtype] = set()
    engines[precision].modules[0].register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    figures = {
        p: [engine.train_step(make_batch(n=32, seed=s)).figures for s in range(2)] for p, engine in engines.items()
    }
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen == {low}
    assert all(p.dtype == torch.float32 for p in engines[precision].backbone.parameters())
    ref, got = (figures[p][0][:-2].tolist() for p in ("fp32", precision))
    assert all(abs(a - b) < 0.03 * abs(a) + 0.01 for a, b in zip(ref, got)), (ref, got)
    assert torch.isfinite(figures[precision][1]).all()
