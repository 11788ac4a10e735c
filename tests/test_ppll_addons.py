"""Add-ons across PPLL stages (locallearn.parallel.cross_stage): EMA shipping for MAN/LAM and one-hop cascade
gradients, each against the sequential engine with the documented semantics."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from locallearn.cli.main import main
from locallearn.methods.bridge import MomentumBridge
from locallearn.parallel.ppll import spawn_ppll
from locallearn.tasks.task import Batch
from locallearn.train import fit, load_checkpoint, load_config
from locallearn.train.build import build_engine, build_loaders
from locallearn.train.config import TrainCfg
from locallearn.train.schedule import lr_at

from .test_ppll import assert_stages_match, ppll_base, run_until_exit

pytestmark = pytest.mark.timeout(240)


def _against_sequential(root: Path, out: Path, method: str, k: int, extra: list[str]) -> None:
    base = ppll_base(root, out, method, k) + extra
    sequential = fit(load_config(None, base), quiet=True)
    pipelined = spawn_ppll(load_config(None, base + ["parallel=ppll", f"ppll.procs={k}"]))
    assert_stages_match(load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt"), pipelined["run_dir"], k)
    assert pipelined["test_acc"] == pytest.approx(sequential["test_acc"], abs=1e-6)


@pytest.mark.parametrize(
    "method,k,extra",
    [
        ("dgl", 2, ["method.addons=[man]"]),  # MAN: EMA of the next stage's first unit, after the local backward
        # LAM with 3 EMA twins (units of stages 1 and 2: a non-adjacent sender), EMA moved after the step
        ("infopro", 3, ["method.addons=[lam]", "method.n_ema=3", "method.ema_update=after_step"]),
    ],
)
def test_ema_shipping_every_step_equals_sequential(
    synthetic_root: Path, tmp_path: Path, method: str, k: int, extra: list[str]
) -> None:
    """``ppll.ema_every=1``: every EMA twin, bridge and module bitwise equal to sequential local learning."""
    _against_sequential(synthetic_root, tmp_path, method, k, extra)


def held_sources_reference(cfg: TrainCfg, every: int) -> dict[str, Any]:
    """The sequential engine (the ``fit`` loop) whose EMA twins follow copies of their source units refreshed
    at steps 0, N, 2N, ... (``ema_update: after_backward``): the documented semantics of ``ppll.ema_every=N``."""
    device = torch.device("cpu")
    train, test, spec = build_loaders(cfg, device)
    engine = build_engine(cfg, spec, device, next(iter(test))[0][: cfg.data.batch_size])
    pairs = []
    for bridge in (m for m in engine.method.modules() if isinstance(m, MomentumBridge)):
        held = [copy.deepcopy(unit) for unit in bridge.live]
        pairs += list(zip(held, bridge.live))
        bridge.live = held
    step, steps_per_epoch = 0, len(train)
    for epoch in range(cfg.run.epochs):
        for i, (x, y, raw) in enumerate(train.batches(epoch)):
            if step % every == 0:
                for held, live in pairs:
                    held.load_state_dict(live.state_dict())
            engine.set_lr(lr_at(cfg.optim, epoch, i, steps_per_epoch, cfg.run.epochs))
            engine.train_step(Batch(x, y, raw))
            step += 1
    return {"model": engine.backbone.state_dict(), "aux": engine.method.state_dict(), "ends": engine.ends}


def test_ema_shipping_every_n_steps_holds_the_source(synthetic_root: Path, tmp_path: Path) -> None:
    """``ppll.ema_every=3`` (K=3, two stages ship): the EMA at step t follows the source's weights after
    3·⌊t/3⌋ steps, bitwise; and that differs from the every-step semantics (the test has teeth)."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 3) + ["method.addons=[man]"]
    pipelined = spawn_ppll(load_config(None, base + ["parallel=ppll", "ppll.procs=3", "ppll.ema_every=3"]))
    assert_stages_match(held_sources_reference(load_config(None, base), 3), pipelined["run_dir"], 3)
    with pytest.raises(AssertionError, match="differ"):
        assert_stages_match(held_sources_reference(load_config(None, base), 1), pipelined["run_dir"], 3)


def test_resume_keeps_the_shipped_weights(synthetic_root: Path, tmp_path: Path) -> None:
    """Stopped after 3 steps with ``ema_every=2`` (version 2 held, a stage's own weights at 3), resumed to 10: the
    checkpointed replica and its version make the resumed run the uninterrupted one, bitwise."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2) + ["method.addons=[man]"]
    first = spawn_ppll(
        load_config(
            None, base + ["parallel=ppll", "ppll.procs=2", "ppll.ema_every=2", "run.max_steps=3", "run.ckpt_every=2"]
        )
    )
    assert load_checkpoint(Path(first["run_dir"]) / "ckpt_stage0.pt")["ema_sources"]["version"] == 2
    assert main(["train", "--resume", first["run_dir"], "run.max_steps=null"]) == 0
    assert_stages_match(held_sources_reference(load_config(None, base), 2), first["run_dir"], 2)


@pytest.mark.parametrize(
    "method,k,extra",
    [
        ("dgl", 2, []),
        ("dgl", 3, ["method.cascade_span=3"]),  # stage 1 relays stage 2's gradient to stage 0
        ("infopro", 2, ["method.cascade_final=both"]),
        ("infopro", 3, []),
        ("dgl", 3, ["method.addons=[cascade,lam]", "method.n_ema=3"]),  # MLAAN: cascades and EMA shipping at once
    ],
)
def test_cascade_across_stages_equals_sequential(
    synthetic_root: Path, tmp_path: Path, method: str, k: int, extra: list[str]
) -> None:
    """One-hop gradient messages: every stage bitwise equal to the sequential engine's cascades."""
    addons = [] if any(e.startswith("method.addons") for e in extra) else ["method.addons=[cascade]"]
    _against_sequential(synthetic_root, tmp_path, method, k, addons + extra)


def _dies_at_step_2(rank: int, world: int, port: int, body, data: dict, out_dir: str, resume: bool, queue) -> None:
    """Rank 1 runs normally, then dies in the middle of step 2 (after receiving its input)."""
    from locallearn.parallel import launch, ppll

    if rank == 1:
        original = ppll.stage_step

        def dying(engine, k, x, batch, link, step, cross=None):
            if step == 2:
                os._exit(3)
            return original(engine, k, x, batch, link, step, cross)

        ppll.stage_step = dying
    launch._spawned(rank, world, port, body, data, out_dir, resume, queue)


def test_a_stage_dying_mid_cascade_fails_its_neighbours(synthetic_root: Path, tmp_path: Path, capfd) -> None:
    """Stage 0 waits for stage 1's gradient, stage 2 for its activation: both exit non-zero, naming stage 1."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 3) + ["method.addons=[cascade]", "parallel=ppll"]
    codes = run_until_exit(_dies_at_step_2, load_config(None, base + ["ppll.timeout=30"]), 3, tmp_path)
    assert codes[1] == 3 and codes[0] not in (None, 0) and codes[2] not in (None, 0), codes
    err = capfd.readouterr().err
    assert "stage 0: stage 1 stopped answering" in err and "stage 2: stage 1 stopped answering" in err, err[-3000:]
    assert err.count("stage 1 died or hangs (no heartbeat)") == 2, err[-3000:]
