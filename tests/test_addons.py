"""Add-ons (docs/methods.md, "Add-ons: MAN, MAN++, HPFF, MLAAN on any base"): momentum bridge (MAN/MAN++),
LAM, cascades (HiLo/MLM), patch fusion."""

from __future__ import annotations

import copy
import math
import weakref
from pathlib import Path

import pytest
import torch

from locallearn import Batch, ClassificationTask, MethodCfg, create_model
from locallearn.local.split import module_sizes, preset_split
from locallearn.methods.bridge import Bridged, MomentumBridge, leap_chain
from locallearn.methods.options import ADDON_PRESETS
from locallearn.methods.pff import PatchFusion, patches
from locallearn.models.units import main_tensor
from locallearn.train.config import OptimCfg, SplitCfg, load_config
from locallearn.train.engine import LocalEngine

from .test_engine import make_batch, make_engine


def params_of(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("base", ["dgl", "infopro"])
@pytest.mark.parametrize("addons,combine", [(["man"], "sum"), (["man"], "scaled"), (["lam"], "sum")])
def test_bridge_gradients_reach_learnable_copies_never_ema(base: str, addons: list[str], combine: str) -> None:
    engine = make_engine(MethodCfg(name=base, addons=addons, bridge_combine=combine), 3)
    batch = make_batch()
    out = engine.modules[0](batch.input)
    objective = engine.method.aux[0].independent
    assert isinstance(objective, Bridged)
    bridge = objective.bridge
    assert len(bridge.ema) == 1 and all(not p.requires_grad for p in bridge.ema.parameters())
    loss = engine.method.local_loss(0, out, batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bridge.learnable.parameters())
    assert all(p.grad is None for p in bridge.ema.parameters())
    assert all(p.grad is None for p in engine.modules[1].parameters())  # the live source unit is untouched
    if combine == "scaled":
        assert bridge.scale.grad is not None
    ema_ids = {id(p) for p in bridge.ema.parameters()}
    assert not ema_ids & {id(p) for group in engine._optimizers for g in group.param_groups for p in g["params"]}


def test_man_copies_next_module_first_unit_and_lam_leaps() -> None:
    engine = make_engine(MethodCfg(name="dgl", addons=["man"]), 3)  # resnet8 units: stem, l1.0, l2.0, l3.0, head
    assert engine.method.aux[0].independent.bridge.sources == [engine.ends[0]]
    cfg = MethodCfg(name="dgl", addons=["lam"], lam_depth=4)
    torch.manual_seed(0)
    r32 = LocalEngine(
        create_model("resnet32", num_classes=4, in_channels=1, width=4),
        cfg,
        ClassificationTask(4),
        OptimCfg(),
        split=SplitCfg(k=15, preset="man"),
    )
    names = [[r32.backbone.infos[i].name for i in leap_chain(r32.method, k)] for k in (0, 6, 10, 13)]
    assert names[0] == ["layer2.0", "layer3.0", "layer3.2", "layer3.4"]  # split in stage 1 (configAuxPlus_new.py)
    assert names[1] == ["layer3.0", "layer3.2", "layer3.3", "layer3.4"]  # split in stage 2
    assert names[2] == ["layer3.1", "layer3.2", "layer3.3", "layer3.4"]
    assert names[3] == ["layer3.4"]


def test_ema_update_matches_closed_form() -> None:
    """After n updates with live weights p_1..p_n: θ_n = m^n·θ_0 + (1−m)·Σ_t m^(n−t)·p_t."""
    engine = make_engine(MethodCfg(name="dgl", addons=["man"], ema_decay=0.9), 3)
    bridge: MomentumBridge = engine.method.aux[0].independent.bridge
    ema = next(iter(bridge.ema.parameters()))
    live = next(iter(bridge.live[0].parameters()))
    theta0 = ema.detach().clone()
    assert torch.equal(theta0, live.detach())  # ema_init=copy
    expected, m = theta0.clone(), 0.9
    for t in range(5):
        with torch.no_grad():
            live.copy_(torch.full_like(live, float(t + 1)))
        bridge.update_ema()
        expected = m * expected + (1 - m) * (t + 1)
    torch.testing.assert_close(ema.detach(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        make_engine(MethodCfg(name="dgl", addons=["man"], ema_decay=1.0), 3)


def test_ema_warmup_decay_follows_min_of_decay_and_warmup_ratio() -> None:
    """With ``ema_warmup`` the t-th update (t = 0, 1, ...) uses m_t = min(m, (1+t)/(10+t)): 0.1, 2/11, 3/12, ...
    until the ratio passes m; the count survives a state-dict round trip (resume continues the schedule)."""
    cfg = MethodCfg(name="dgl", addons=["man"], ema_decay=0.5, ema_warmup=True)
    engine = make_engine(cfg, 3)
    bridge: MomentumBridge = engine.method.aux[0].independent.bridge
    ema = next(iter(bridge.ema.parameters()))
    live = next(iter(bridge.live[0].parameters()))
    expected = ema.detach().double().clone()
    decays = []
    for t in range(10):
        with torch.no_grad():
            live.copy_(torch.full_like(live, float(t + 1)))
        m = min(0.5, (1 + t) / (10 + t))
        decays.append(m)
        bridge.update_ema()
        expected = m * expected + (1 - m) * (t + 1)
    assert decays[:3] == [0.1, 2 / 11, 0.25] and decays[7] < 0.5 == decays[8] == decays[9]  # (1+8)/(10+8) = m
    torch.testing.assert_close(ema.detach().double(), expected, rtol=1e-6, atol=1e-6)
    other = make_engine(cfg, 3, seed=1)
    other.load_state_dict(copy.deepcopy(engine.state_dict()))
    assert other.method.aux[0].independent.bridge.ema_updates.item() == 10
    plain = make_engine(MethodCfg(name="dgl", addons=["man"], ema_decay=0.5), 3)
    assert not hasattr(plain.method.aux[0].independent.bridge, "ema_updates")  # old checkpoints keep loading


def test_ema_moves_toward_source_during_training_and_round_trips() -> None:
    engine = make_engine(MethodCfg(name="dgl", addons=["man"], ema_decay=0.5), 3)
    bridge = engine.method.aux[0].independent.bridge
    start = torch.cat([p.detach().flatten() for p in bridge.ema.parameters()])
    for s in range(3):
        engine.train_step(make_batch(seed=s))
    live = torch.cat([p.detach().flatten() for p in bridge.live[0].parameters()])
    ema = torch.cat([p.detach().flatten() for p in bridge.ema.parameters()])
    assert not torch.equal(ema, start) and (live - ema).norm() < (live - start).norm()
    state = copy.deepcopy(engine.state_dict())
    other = make_engine(MethodCfg(name="dgl", addons=["man"], ema_decay=0.5), 3, seed=1)
    other.load_state_dict(state)
    got = torch.cat([p.detach().flatten() for p in other.method.aux[0].independent.bridge.ema.parameters()])
    assert torch.equal(got, ema)


def recompute_grads(engine: LocalEngine, batch) -> dict[int, torch.Tensor]:
    """Reference cascade: for every loss of reach r at module i, rerun modules i−r+1..i from the detached input
    of module i−r+1 and take its gradient; sum everything (what the efficient engine must equal)."""
    engine.backbone.train()
    engine.method.train()
    inputs, h = [], batch.input
    with torch.no_grad():
        for module in engine.modules:
            inputs.append(h)
            h = module(h)
    every = [p for k in range(engine.k) for p in engine.module_parameters(k)]
    total = {id(p): torch.zeros_like(p) for p in every}
    for i in range(engine.k):
        for reach in sorted({r for _, r in engine.method.local_losses(i, engine.modules[i](inputs[i]), batch)}):
            first = max(0, i - reach + 1)
            h = inputs[first]
            for j in range(first, i + 1):
                h = engine.modules[j](h)
            for loss, r in engine.method.local_losses(i, h, batch):
                if r != reach:
                    continue
                grads = torch.autograd.grad(loss, every, allow_unused=True, retain_graph=True)
                for p, g in zip(every, grads):
                    if g is not None:
                        total[id(p)] += g
    return total


@pytest.mark.parametrize("base", ["dgl", "infopro"])
@pytest.mark.parametrize("span,final", [(2, "cascade"), (3, "both"), (2, "plain")])
def test_efficient_cascade_equals_recompute(base: str, span: int, final: str) -> None:
    cfg = MethodCfg(name=base, addons=["cascade"], cascade_span=span, cascade_final=final, w_ind=0.3, w_casc=0.7)
    engine = make_engine(cfg, 4)
    reference = copy.deepcopy(engine)
    batch = make_batch()
    engine.set_lr(0.0)  # keep the gradients and the parameters of the step for comparison
    engine.train_step(batch)
    expected = recompute_grads(reference, batch)
    for k in range(engine.k):
        for p, q in zip(engine.module_parameters(k), reference.module_parameters(k)):
            got = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(got, expected[id(q)], rtol=1e-4, atol=1e-6)


def test_cascade_reaches_exactly_its_span() -> None:
    """Module 3's cascade loss (span 3) has gradient in modules 1..3 and nothing in module 0."""
    engine = make_engine(MethodCfg(name="dgl", addons=["cascade"], cascade_span=3), 4)
    engine.set_lr(0.0)
    batch = make_batch()
    engine.method.local_losses = _only_module(engine.method.local_losses, 2)  # keep just module 2's losses
    engine.train_step(batch)
    touched = [any(p.grad is not None and p.grad.any() for p in engine.modules[k].parameters()) for k in range(4)]
    assert touched == [True, True, True, False]
    engine = make_engine(MethodCfg(name="dgl", addons=["cascade"], cascade_span=2), 4)
    engine.set_lr(0.0)
    engine.method.local_losses = _only_module(engine.method.local_losses, 2)
    engine.train_step(batch)
    touched = [any(p.grad is not None and p.grad.any() for p in engine.modules[k].parameters()) for k in range(4)]
    assert touched == [False, True, True, False]


@pytest.mark.parametrize("addons", [["cascade"], ["cascade", "lam"]])
def test_a_cascade_frees_each_aux_graph_before_the_next_module_runs(addons: list[str]) -> None:
    """A cascade's backward retains the graphs (the next module's hop walks module k's), but nothing walks module
    k's aux net again: what its losses saved must be gone before module k+1 runs, or two aux graphs sit in memory
    at once (InfoPro+MLAAN at K=8 held 116 instead of 58 MiB of saved activations)."""
    engine = make_engine(MethodCfg(name="infopro", addons=addons, cascade_final="both"), 4)
    batch = make_batch()
    state = [*engine.backbone.parameters(), *engine.backbone.buffers(), *engine.method.parameters()]
    state += [*engine.method.buffers(), batch.target, batch.image01]
    lasting = {t.untyped_storage()._cdata for t in state}  # what outlives a step anyway
    saved: dict[int, list] = {}
    local_losses, forward_module = engine.method.local_losses, engine.forward_module

    def recording_losses(k, out, batch):
        refs = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in lasting and storage._cdata != main_tensor(out).untyped_storage()._cdata:
                refs.append(weakref.ref(storage))
            return t.detach()  # not t: an output saved by its own node would make a cycle that outlives the graph

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            items = local_losses(k, out, batch)
        saved[k] = refs
        return items

    alive = {}

    def checking_forward(k, x):
        if k > 0:
            alive[k - 1] = sum(ref() is not None for ref in saved[k - 1])
        return forward_module(k, x)

    engine.method.local_losses, engine.forward_module = recording_losses, checking_forward
    engine.train_step(batch)
    assert all(saved[k] for k in range(3)) and alive == {0: 0, 1: 0, 2: 0}


def _only_module(fn, keep: int):
    def losses(k, h, batch):
        items = fn(k, h, batch)
        return items if k == keep else [type(item)(item.loss * 0, item.reach) for item in items]

    return losses


def test_patch_fusion_equals_unpatched_linear_head_and_handles_odd_sizes() -> None:
    """With a GAP + linear head (0c1f, softmax), the mean of patch logits is the whole map's logits when
    patches are equal; odd sizes split into near-equal patches."""
    engine = make_engine(MethodCfg(name="infopro", aux="0c1f", loss_mode="softmax", lambdas=[0, 1, 0, 1]), 3)
    objective = engine.method.aux[0].independent
    h = torch.randn(4, objective.head.net[-1].in_features, 8, 8)
    fused = PatchFusion(objective, 2)
    torch.testing.assert_close(fused.logits(h), objective.logits(h), rtol=1e-5, atol=1e-6)
    assert [tuple(p.shape[-2:]) for p in patches(torch.zeros(1, 1, 7, 5), 2)] == [(4, 3), (4, 2), (3, 3), (3, 2)]
    with pytest.raises(ValueError, match="at least 3"):
        patches(torch.zeros(1, 1, 2, 2), 3)


@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_sequential_patch_fusion_gives_same_loss_and_gradients(base: str) -> None:
    results = []
    for sequential in (False, True):
        engine = make_engine(MethodCfg(name=base, addons=["pff"], pff_sequential=sequential), 3)
        batch = make_batch()
        out = engine.modules[0](batch.input)
        loss = engine.method.local_loss(0, out, batch)
        grads = torch.autograd.grad(loss, engine.module_parameters(0))
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base", ["dgl", "infopro"])
@pytest.mark.parametrize(
    "addons",
    [["man"], ["lam"], ["pff"], ["cascade"], ["cascade", "lam"], ["cascade", "pff"], ["man", "pff", "cascade"]],
)
def test_every_combination_trains(base: str, addons: list[str]) -> None:
    engine = make_engine(MethodCfg(name=base, addons=addons), 3)
    for s in range(2):
        losses = engine.train_step(make_batch(seed=s)).losses()
    assert all(torch.isfinite(torch.tensor(losses)))
    result = engine.evaluate([(b.input, b.target, b.raw) for b in [make_batch(seed=5)]])
    assert 0 <= result["test_acc"] <= 1


def test_bad_addons_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown add-on 'mann'"):
        make_engine(MethodCfg(name="dgl", addons=["mann"]), 3)
    with pytest.raises(ValueError, match="pick one"):
        make_engine(MethodCfg(name="dgl", addons=["man", "lam"]), 3)
    with pytest.raises(ValueError, match="addons must be empty"):
        make_engine(MethodCfg(name="e2e", addons=["man"]), 1)


ADDON_PRESET_FILES = sorted(Path("configs/cifar10").glob("*_*_*_k*.yaml"))
ADDON_PRESET_FILES = [f for f in ADDON_PRESET_FILES if any(f"_{p}_k" in f.name for p in ADDON_PRESETS)]


@pytest.mark.parametrize("path", ADDON_PRESET_FILES, ids=lambda p: p.stem)
def test_every_addon_preset_builds_and_trains(path: Path) -> None:
    """The papers' presets (ResNet-32 K=8/16, ResNet-110 K=32/55 true modules) on tiny inputs: a thin network
    (width 4), 4 images of 3×32×32, one step."""
    cfg = load_config(path, ["model.width=4"])
    torch.manual_seed(0)
    backbone = create_model(cfg.model.name, num_classes=10, in_channels=3, width=cfg.model.width)
    engine = LocalEngine(backbone, cfg.method, ClassificationTask(10), cfg.optim, split=cfg.split)
    assert engine.k == cfg.split.k
    raw = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    result = engine.train_step(
        Batch(raw.float().div(255).contiguous(memory_format=torch.channels_last), torch.arange(4), raw)
    )
    assert all(math.isfinite(v) for v in result.losses())


def test_paper_k_labels_warn_and_map_to_true_counts() -> None:
    with pytest.warns(UserWarning, match="label K=16 is 15"):
        ends = preset_split("man", 5, 16)
    assert len(ends) == 15 and module_sizes(ends)[0] == 2  # the stem is merged into the first module
    with pytest.warns(UserWarning, match="label K=32 is 33"):
        assert len(preset_split("manpp", 18, 32)) == 33
