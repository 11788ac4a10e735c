"""``method.checkpoint``: activation checkpointing inside each local module (and for E2E). After training steps
the parameters, BatchNorm statistics (``num_batches_tracked`` moves once per step) and logged losses equal the
un-checkpointed run bitwise on CPU, for E2E, the bases and every add-on; gradient isolation still holds; the
checkpoint really recomputes (fewer saved bytes); PPLL honours it per stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.local.checkpointing import CheckpointedSequential, segment_count
from locallearn.measure import SavedTensorMeter

from .test_engine import make_batch

CASES = [
    ("e2e", 1, {}),
    ("dgl", 2, {}),
    ("infopro", 3, {}),
    ("dgl", 3, {"addons": ["man"]}),
    ("infopro", 3, {"addons": ["cascade", "pff"], "cascade_final": "both"}),
    ("dgl", 3, {"addons": ["cascade", "lam"], "cascade_final": "both"}),
]


def engine_for(name: str, k: int, extra: dict, checkpoint: int | str) -> LocalEngine:
    torch.manual_seed(0)
    backbone = create_model("resnet20", num_classes=4, in_channels=1, width=4)
    for m in backbone.modules():  # dropout in the units: the recomputation must replay the same masks
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda mod, inp, out: nn.functional.dropout(out, 0.1, mod.training))
    cfg = MethodCfg(name=name, checkpoint=checkpoint, **extra)
    return LocalEngine(backbone, cfg, ClassificationTask(4), OptimCfg(lr=0.05), split=k)


def state(engine: LocalEngine) -> dict[str, torch.Tensor]:
    return {**engine.backbone.state_dict(), **{f"aux.{k}": v for k, v in engine.method.state_dict().items()}}


@pytest.mark.parametrize("name,k,extra", CASES, ids=[f"{n}{'+' + '+'.join(e.get('addons', []))}" for n, _, e in CASES])
@pytest.mark.parametrize("checkpoint", [2, "sqrt"])
def test_checkpointed_steps_equal_plain_steps_bitwise(name: str, k: int, extra: dict, checkpoint) -> None:
    plain, ckpt = engine_for(name, k, extra, 0), engine_for(name, k, extra, checkpoint)
    assert any(isinstance(m, CheckpointedSequential) for m in ckpt.modules)
    figures = {}
    for step in range(3):
        batch = make_batch(seed=step)
        for engine in (plain, ckpt):
            torch.manual_seed(100 + step)  # the same dropout stream for both
            figures[engine] = engine.train_step(batch).figures
    a, b = state(plain), state(ckpt)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(figures[plain], figures[ckpt])
    tracked = [v for key, v in b.items() if key.endswith("num_batches_tracked") and not key.startswith("aux.")]
    assert tracked and all(int(v) == 3 for v in tracked)  # once per step, not again by the recomputation


def test_checkpointing_keeps_fewer_saved_tensors_and_isolation() -> None:
    """The meter sees fewer saved bytes (segments are recomputed), and a module's loss still reaches only it."""
    from .test_engine import assert_gradient_isolation

    peaks = {}
    for checkpoint in (0, "sqrt"):
        engine = engine_for("dgl", 2, {}, checkpoint)
        engine.meter = meter = SavedTensorMeter()
        with meter:
            engine.train_step(make_batch())
        peaks[checkpoint] = meter.peak
        assert_gradient_isolation(engine, make_batch(seed=5))
    assert peaks["sqrt"] < 0.8 * peaks[0]


def test_segment_count_and_bad_values() -> None:
    assert [segment_count("sqrt", n) for n in (1, 4, 9, 10, 55)] == [1, 2, 3, 3, 7]
    assert segment_count(3, 2) == 2 and segment_count(0, 9) == 1
    with pytest.raises(ValueError, match="method.checkpoint"):
        segment_count(-1, 4)


def test_ppll_honours_checkpointing_per_stage(synthetic_root: Path, tmp_path: Path) -> None:
    from locallearn.parallel.ppll import spawn_ppll
    from locallearn.train import fit, load_checkpoint, load_config

    from .conftest import tiny_overrides
    from .test_ppll import assert_stages_match

    base = [*tiny_overrides(synthetic_root, tmp_path), "method.name=dgl", "split.k=2", "run.threads=1"]
    base += ["model.width=4", "run.epochs=1", "method.checkpoint=2"]
    sequential = fit(load_config(None, [*base, "method.checkpoint=0"]), quiet=True)
    result = spawn_ppll(load_config(None, [*base, "parallel=ppll"]), 2, timeout=240)
    assert_stages_match(load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt"), Path(result["run_dir"]), 2)


BRIDGED = [
    ("dgl", {"addons": ["man"]}),
    ("dgl", {"addons": ["cascade", "pff"], "cascade_final": "both"}),
    ("infopro", {"addons": ["man"], "bridge_combine": "scaled", "ema_warmup": True}),
    ("dgl", {"addons": ["cascade", "lam"], "cascade_final": "both"}),
    ("infopro", {"addons": ["cascade", "lam"], "cascade_final": "both"}),
]


@pytest.mark.parametrize(
    "name,extra", BRIDGED, ids=["dgl+man", "dgl+hpff", "infopro+manpp", "dgl+mlaan", "infopro+mlaan"]
)
def test_recomputed_bridges_train_bitwise_like_kept_ones_and_keep_fewer_activations(name: str, extra: dict) -> None:
    """``aux_recompute`` rebuilds MAN/LAM bridge chains during the aux backward and ``cascade_recompute`` a cascade
    module's graph for each backward that walks it: parameters, EMA copies, BatchNorm statistics (backbone and aux
    copies, moved once per step) and losses equal the kept-activation run bitwise; fewer bytes are saved."""
    engines, peaks = {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        backbone = create_model("resnet20", num_classes=4, in_channels=1, width=4)
        cfg = MethodCfg(name=name, aux_recompute=recompute, cascade_recompute=recompute, **extra)
        engines[recompute] = LocalEngine(backbone, cfg, ClassificationTask(4), OptimCfg(lr=0.05), split=3)
    figures = {}
    for step in range(3):
        for recompute, engine in engines.items():
            engine.meter = meter = SavedTensorMeter() if step == 0 else None
            with meter or torch.enable_grad():
                figures[recompute] = engine.train_step(make_batch(seed=step)).figures
            if meter is not None:
                peaks[recompute] = meter.peak
    a, b = state(engines[False]), state(engines[True])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(figures[False], figures[True])
    # Once per step in the backbone and the bridge copies (PFF's aux heads see every patch, in both runs alike).
    tracked = [
        v for key, v in b.items() if key.endswith("num_batches_tracked") and ("bridge" in key or "aux." not in key)
    ]
    assert tracked and all(int(v) == 3 for v in tracked)
    assert peaks[True] < peaks[False]
