"""Your own nn.Module: ``UnitBackbone.from_module`` on a torchvision-style ResNet-50, a U-Net with three skips, a
ViT and a net with drop path and dropout (tests/user_models.py): shapes for K = 1..4, K=1 ≡ E2E bitwise, gradient
isolation of skips probed from outside, the state_dict round trip into the user's class, every add-on, PPLL ≡
sequential, and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from locallearn import UnitBackbone
from locallearn.cli.main import main
from locallearn.methods.options import MethodCfg
from locallearn.models.capture import CaptureError
from locallearn.parallel.data_parallel import fit_dp
from locallearn.tasks.task import Batch, ClassificationTask
from locallearn.train import fit, load_checkpoint, load_config
from locallearn.train.config import OptimCfg, SplitCfg
from locallearn.train.engine import LocalEngine
from locallearn.train.schedule import build_optimizer

from . import user_models
from .conftest import (
    assert_grads_of_isolated_losses,
    assert_ppll_equals_sequential,
    learn_on_fashion_mnist,
    tiny_overrides,
)

MODELS = {
    "resnet50": user_models.resnet50,
    "unet": user_models.unet,
    "vit": lambda: user_models.vit(image=16),
    "drop_path": user_models.stochastic_depth,  # torch.rand(x.shape[0], ...) and dropout: fx cannot trace it
}
SIDE = 16


def batch(seed: int = 0, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIDE, SIDE, generator=g)
    return Batch(x, torch.randint(0, 10, (n,), generator=g), (x * 40 + 128).clamp(0, 255).to(torch.uint8))


def engine_for(model: torch.nn.Module, k: int, method: str = "dgl", addons: tuple[str, ...] = (), **kw) -> LocalEngine:
    """An engine over ``model`` (captured here), or over a captured backbone as it is, split into ``k`` modules."""
    backbone = model if isinstance(model, UnitBackbone) else UnitBackbone.from_module(model, batch().input[:2])
    cfg = MethodCfg(name=method, addons=list(addons), loss_mode="softmax", cascade_span=2, **kw)
    split = SplitCfg(k=k)
    return LocalEngine(backbone, cfg, ClassificationTask(10), OptimCfg(lr=0.05), split=split, channels_last=False)


CAPTURED: dict[str, UnitBackbone] = {}


def captured(name: str) -> UnitBackbone:
    """A fresh copy of MODELS[name] (seed 0) captured once per test session (a capture costs a second or two)."""
    if name not in CAPTURED:
        torch.manual_seed(0)
        CAPTURED[name] = UnitBackbone.from_module(MODELS[name](), batch().input[:2])
    return copy.deepcopy(CAPTURED[name])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_shapes_for_every_k(name: str, k: int) -> None:
    backbone = captured(name)
    model = backbone.source
    engine = engine_for(backbone, k)
    assert engine.k == k and len(engine.ends) == k
    b = batch()
    model.eval()
    engine.backbone.eval()
    h = b.input
    for module in engine.modules:
        h = module(h)
    expected = user_models.ViTOutput if name == "vit" else torch.Tensor
    reference = model(b.input)
    assert isinstance(reference, expected)
    assert torch.equal(h, reference.logits if name == "vit" else reference)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in engine.train_step(b).losses())


@pytest.mark.parametrize("name", MODELS)
def test_k1_is_end_to_end_bitwise(name: str) -> None:
    """K=1 trains the user's model exactly as a hand-written loop over the original class does."""
    backbone = captured(name)
    model = backbone.source
    reference = copy.deepcopy(model)
    engine = engine_for(backbone, 1, method="e2e")
    optim = build_optimizer([p for p in reference.parameters() if p.requires_grad], OptimCfg(lr=0.05))
    for step in range(3):
        b = batch(step)
        torch.manual_seed(step)  # the same dropout masks on both sides
        engine.train_step(b)
        torch.manual_seed(step)
        out = reference(b.input)
        loss = F.cross_entropy(out.logits if name == "vit" else out, b.target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs"


@pytest.mark.parametrize("name", MODELS)
def test_no_gradient_crosses_a_module_boundary_skips_included(name: str) -> None:
    """Probed from outside: every tensor a module receives (the main activation and each carried skip) needs no
    gradient, and each module's accumulated gradient equals that of its own local loss alone."""
    engine = engine_for(captured(name), 3)
    engine.step_mode = "end"
    reference = copy.deepcopy(engine)
    b = batch()
    seen: list[list[bool]] = []
    for module in engine.modules:
        module.register_forward_pre_hook(
            lambda m, args: seen.append([t.requires_grad for t in (args[0] if isinstance(args[0], tuple) else args)])
        )
    engine.set_lr(0.0)
    torch.manual_seed(1)  # the same dropout masks (the ViT's blocks) in the engine and in the probe below
    engine.train_step(b)
    carried = [len(flags) for flags in seen[1:]]
    assert not any(flag for flags in seen[1:] for flag in flags)
    if name == "unet":
        assert max(carried) >= 2, "the U-Net's skips should cross at least one cut"
    torch.manual_seed(1)
    assert_grads_of_isolated_losses(engine, reference, b)


@pytest.mark.parametrize("method,k", [("e2e", 1), ("dgl", 2)])
def test_checkpointing_across_carried_skips_is_bitwise_the_plain_run(method: str, k: int) -> None:
    """``method.checkpoint=sqrt`` on the U-Net: checkpoint segments end where skips are still open, so segment
    inputs are carries; two steps equal the un-checkpointed ones bit for bit, BatchNorm counted once per step."""
    states = []
    for checkpoint in (0, "sqrt"):
        torch.manual_seed(0)
        model = user_models.unet()
        backbone = UnitBackbone.from_module(model, batch().input[:2], k=k)
        cfg = MethodCfg(name=method, checkpoint=checkpoint)
        engine = LocalEngine(backbone, cfg, ClassificationTask(10), OptimCfg(lr=0.05), channels_last=False)
        for step in range(2):
            engine.train_step(batch(step))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    assert states[1]["enc1.1.num_batches_tracked"].item() == 2


def test_unet_cut_in_the_encoder_carries_every_open_skip() -> None:
    model = user_models.unet()
    backbone = UnitBackbone.from_module(model, batch().input[:2], cuts=["enc2", "bottleneck"])
    assert backbone.planned_ends is not None and len(backbone.planned_ends) == 3
    ends = backbone.planned_ends
    assert len(backbone.carries_across(ends[:1] + ends[-1:])) == 1  # after enc2: e1 rides along
    assert len(backbone.carried[ends[1] - 1]) == 3  # after the bottleneck: e1, e2, e3


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_loads_back_into_the_users_class(name: str) -> None:
    backbone = captured(name)
    model = backbone.source
    engine = engine_for(backbone, 3, addons=("man",))
    for step in range(2):
        engine.train_step(batch(step))
    state = engine.backbone.state_dict()
    assert list(state) == list(model.state_dict())
    running = [k for k in state if k.endswith("running_mean")]
    if running:  # BatchNorm statistics moved in the user's own buffers
        assert not torch.equal(state[running[0]], torch.zeros_like(state[running[0]]))
    fresh = MODELS[name]()
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    engine.backbone.eval()
    x = batch(5).input
    out = fresh(x)
    assert torch.equal(engine.backbone(x), out.logits if name == "vit" else out)


@pytest.mark.parametrize(
    "addons",
    [("man",), ("man",), ("pff",), ("lam", "cascade"), ("pff", "cascade")],
    ids=["man", "manpp", "hpff", "mlaan", "hpff-cascade"],
)
@pytest.mark.parametrize("method", ["dgl", "infopro"])
def test_every_addon_trains_a_unet(method: str, addons: tuple[str, ...], request) -> None:
    torch.manual_seed(0)
    extra = {"bridge_combine": "scaled"} if "manpp" in request.node.callspec.id else {}
    engine = engine_for(user_models.unet(), 3, method, addons, **extra)
    for step in range(2):
        losses = engine.train_step(batch(step)).losses()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses)
    result = engine.evaluate([(b.input, b.target, b.raw) for b in [batch(9)]])
    assert 0 <= result["test_acc"] <= 1


def test_train_and_eval_modes_follow_the_original() -> None:
    """The ViT's blocks call F.dropout(..., self.training): eval mode must be deterministic and equal the model's."""
    torch.manual_seed(0)
    model = user_models.vit(image=SIDE)
    backbone = UnitBackbone.from_module(model, batch().input[:2], k=2)
    x = batch().input
    backbone.train()
    assert not torch.equal(backbone(x), backbone(x))  # dropout active
    backbone.eval()
    model.eval()
    assert torch.equal(backbone(x), model(x).logits)
    assert not model.training and not model.blocks[0].training


class TwoHeads(torch.nn.Module):
    """Returns a tuple, or a dict without a ``logits`` key: the prediction is picked by ``output``."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.body, self.first, self.second = (
            user_models.double_conv(1, 4),
            torch.nn.Linear(4, 3),
            torch.nn.Linear(4, 10),
        )
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> tuple | dict:
        h = self.body(x).mean((2, 3))
        return {"aux": self.first(h), "main": self.second(h)} if self.as_dict else (self.first(h), self.second(h))


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_output_picks_the_prediction(as_dict: bool) -> None:
    x = batch().input
    model = TwoHeads(as_dict).eval()
    assert UnitBackbone.from_module(model, x[:2]).eval()(x).shape == (8, 3)  # default: the first tensor
    picked = UnitBackbone.from_module(model, x[:2], output="main" if as_dict else 1).eval()
    assert torch.equal(picked(x), model(x)["main" if as_dict else 1])


def test_a_size_read_early_is_read_again_after_the_cut_and_fx_carries_it() -> None:
    """Exported, the batch size read at the top is read again from the carried tensor after the cut: only tensors
    cross, any batch size works and PPLL takes it. Traced by fx (leaf_modules), the size rides in the carry: it
    trains in one process and PPLL refuses it, naming it."""
    from locallearn.parallel.cross_stage import check_supported
    from locallearn.train.config import ConfigError

    model = user_models.SizeEarly().eval()
    backbone = UnitBackbone.from_module(model, batch().input[:2], cuts=["block1"]).eval()
    assert backbone.untensored == [[], []] and backbone.carried == [[], []]
    x = batch(n=5).input
    assert torch.equal(backbone(x), model(x))
    engine = LocalEngine(backbone.train(), MethodCfg(name="dgl"), ClassificationTask(10), OptimCfg(lr=0.05))
    check_supported(engine)
    traced = UnitBackbone.from_module(user_models.SizeEarly(), x[:2], cuts=["block1"], leaf_modules=["block2"])
    engine = LocalEngine(traced, MethodCfg(name="dgl"), ClassificationTask(10), OptimCfg(lr=0.05))
    result = engine.train_step(batch())  # the size rides in the carry, untouched by detaching
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses())
    with pytest.raises(ConfigError, match="non-tensor value of your model"):
        check_supported(engine)


def test_refusals_name_the_problem_and_the_way_out() -> None:
    x = batch().input[:2]
    with pytest.raises(CaptureError, match="did you mean 'layer1'"):
        UnitBackbone.from_module(user_models.resnet50(), x, cuts=["layr1"])
    with pytest.raises(CaptureError, match="leaf_modules"):
        UnitBackbone.from_module(user_models.DataDependent(), x)
    opaque = UnitBackbone.from_module(user_models.DataDependent(), x, leaf_modules=["gate"])
    assert len(opaque) >= 1
    with pytest.raises(CaptureError, match="runs 3 times"):
        UnitBackbone.from_module(user_models.Looped(), x, cuts=["shared"])
    with pytest.raises(CaptureError, match="no parameters"):
        UnitBackbone.from_module(user_models.resnet50(), x, cuts=["relu", "maxpool"])
    with pytest.raises(CaptureError, match="'proj.weight' is used by local modules 0 and 1"):
        UnitBackbone.from_module(user_models.Tied(), x, cuts=["block2"])
    with pytest.raises(CaptureError, match="nothing of the model runs after it"):
        UnitBackbone.from_module(user_models.resnet50(), x, cuts=["fc"])
    with pytest.raises(CaptureError, match="output='scores'"):
        UnitBackbone.from_module(user_models.vit(image=SIDE), x, output="scores")
    with pytest.raises(CaptureError, match="make 3 modules, not k=2"):
        UnitBackbone.from_module(user_models.unet(), x, cuts=["enc1", "enc2"], k=2)


FMNIST = Path("/usr/share/datasets/fashion-mnist")
LEARNS = 0.3  # test accuracy after 64 steps that chance (0.1) does not reach


def test_cli_trains_your_own_model_with_an_addon(synthetic_root: Path, tmp_path: Path) -> None:
    args = tiny_overrides(synthetic_root, tmp_path) + [
        "model.name=tests.user_models:unet",
        "model.kwargs.width=4",
        "method.name=dgl",
        "split.cuts=[enc2,dec3]",
        "method.addons=[man]",
        "run.max_steps=3",
    ]
    assert main(["train", "-c", "configs/fmnist/demo.yaml", *args, "split.k=null"]) == 0
    run = next((tmp_path).glob("*unet_dgl+man_k3*"))
    state = load_checkpoint(run / "ckpt_last.pt")
    assert set(state["model"]) == set(user_models.unet(width=4).state_dict())  # the user's own keys
    assert main(["train", "--resume", str(run), "run.max_steps=5"]) == 0  # the saved config rebuilds the model
    assert load_checkpoint(run / "ckpt_last.pt")["step"] == 5
    bench = ["bench", "memory", "-c", "configs/fmnist/demo.yaml", "--methods", "e2e,dgl,dgl+man", "--k", "3"]
    assert main([*bench, "--out", str(tmp_path / "bench"), *args, "split.k=null"]) == 0
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert {(r["label"], r["k"]) for r in rows} == {("e2e", 1), ("dgl", 3), ("dgl+man", 3)}
    summary = ["model.name=tests.user_models:resnet50", "method.name=dgl", "split.cuts=[layer2,layer3]"]
    assert main(["summary", "-c", "configs/fmnist/demo.yaml", *summary, "split.k=null"]) == 0  # on the meta device


def test_a_parameter_shared_inside_one_module_trains_as_in_the_original() -> None:
    """Tied's ``proj`` runs twice; with both uses in one module, K=1 training equals the original's."""
    torch.manual_seed(0)
    model = user_models.Tied()
    reference = copy.deepcopy(model)
    engine = LocalEngine(
        UnitBackbone.from_module(model, batch().input[:2], k=1),
        MethodCfg(name="e2e"),
        ClassificationTask(10),
        OptimCfg(lr=0.05),
        channels_last=False,
    )
    optim = build_optimizer(list(reference.parameters()), OptimCfg(lr=0.05))
    for step in range(2):
        b = batch(step)
        engine.train_step(b)
        optim.zero_grad(set_to_none=True)
        F.cross_entropy(reference(b.input), b.target).backward()
        optim.step()
    assert torch.equal(model.proj.weight, reference.proj.weight)
    assert not torch.equal(model.proj.weight, user_models.Tied().proj.weight)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=tests.user_models:nope", "has no 'nope'"),
        ("model.name=no_such_package.nets:build", "cannot import 'no_such_package.nets'"),
        ("model.name=tests.user_models:unet model.kwargs.depth=50", "model.kwargs"),
        ("model.name=tests.user_models:unet model.kwargs.num_classes=7", "set the builder's class count"),
        ("model.name=tests.user_models:unet split.cuts=[enc9]", "did you mean 'enc"),
        ("split.cuts=[layer1]", "split.cuts names submodules of your own model"),
        ("model.name=tests.user_models:vit", "the model fails on an example input of shape [2, 1, 16, 16]"),
    ],
)
def test_cli_refusals_are_one_line_exit_2(
    synthetic_root: Path, tmp_path: Path, capsys, override: str, message: str
) -> None:
    args = tiny_overrides(synthetic_root, tmp_path) + ["model.kwargs={}", *override.split()]
    assert main(["train", "-c", "configs/fmnist/demo.yaml", *args, "split.k=null"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_resnet50_from_the_user_learns_real_fashion_mnist(tmp_path: Path) -> None:
    cfg = load_config(
        "configs/fmnist/demo.yaml",
        [
            "model.name=tests.user_models:resnet50",
            "model.kwargs.width=8",
            "method.name=dgl",
            "split.cuts=[layer2]",
            "split.k=null",
            "data.limit_train=6000",
            "data.batch_size=64",
            "data.limit_test=1000",
            "run.epochs=2",
            "run.threads=1",
            f"run.out={tmp_path}",
            "run.progress=false",
        ],
    )
    result = fit(cfg, quiet=True)
    assert result["test_acc"] > 0.6, f"did not learn: test accuracy {result['test_acc']:.3f}"


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_drop_path_model_learns_real_fashion_mnist_with_dgl_k3(tmp_path: Path) -> None:
    """64 steps on 2,048 real images, K=3 balanced over the captured blocks: well above chance (0.1); measured
    0.53."""
    overrides = ["model.name=tests.user_models:stochastic_depth", "model.kwargs.width=16", "method.name=dgl"]
    accuracy = learn_on_fashion_mnist("configs/fmnist/demo.yaml", [*overrides, "split.k=3"], tmp_path)
    assert accuracy > LEARNS, f"did not learn: test accuracy {accuracy:.3f}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("addons", ["[]", "[lam,cascade]"], ids=["dgl", "dgl+mlaan"])
def test_ppll_two_ranks_equal_sequential_on_the_unet(synthetic_root: Path, tmp_path: Path, addons: str) -> None:
    """Cut after enc3, the skips e1 and e2 cross the process boundary with the main activation (and, with MLAAN's
    cascade, their gradients cross back); each stage's weights and aux net equal the sequential engine's, bit for
    bit."""
    base = tiny_overrides(synthetic_root, tmp_path) + [
        "model.name=tests.user_models:unet",
        "model.kwargs.width=4",
        "method.name=dgl",
        "split.cuts=[enc3]",
        f"method.addons={addons}",
        "run.epochs=1",
        "data.batch_size=120",
        "run.threads=1",
    ]
    assert_ppll_equals_sequential(base, steps=5)


@pytest.mark.timeout(240)
def test_data_parallel_trains_a_user_model(synthetic_root: Path, tmp_path: Path) -> None:
    """``parallel=dp``: 2 replicas of the user's ViT (class token, position embedding, dataclass output) train
    and save the user's own state_dict keys."""
    cfg = load_config(
        None,
        tiny_overrides(synthetic_root, tmp_path)
        + [
            "model.name=tests.user_models:vit",
            "model.kwargs.image=16",
            "method.name=dgl",
            "split.cuts=[blocks.1]",
            "run.max_steps=4",
            "run.threads=1",
            "parallel=dp",
            "ppll.procs=2",
        ],
    )
    result = fit_dp(cfg)
    state = load_checkpoint(Path(result["run_dir"]) / "ckpt_last.pt")
    assert state["step"] == 4 and set(state["model"]) == set(user_models.vit(image=16).state_dict())
    assert 0 <= result["test_acc"] <= 1
