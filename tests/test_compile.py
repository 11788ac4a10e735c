"""``run.compile``: every method and add-on trains compiled to the eager engine's parameters, and compiles nothing
new after its first train and eval steps (docs/configuration.md, ``run.compile``).

The fast tests use the ``aot_eager`` backend (dynamo's capture and AOT autograd, without code generation: the part
that breaks on a Python-level construct); the inductor test builds C++ kernels with the system compiler and takes
minutes on this CPU, so it is marked slow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from locallearn import MethodCfg
from locallearn.train.engine import LocalEngine

from .test_engine import make_batch, make_engine

METHODS = {
    "e2e": MethodCfg(name="e2e"),
    "dgl": MethodCfg(name="dgl"),
    "dgl-cnn": MethodCfg(name="dgl", dgl_head="cnn"),
    "infopro-contrast": MethodCfg(name="infopro", loss_mode="contrast"),
    "infopro-softmax": MethodCfg(name="infopro", loss_mode="softmax", aux="2c2f"),
    "dgl+man": MethodCfg(name="dgl", addons=["man"]),
    "infopro+manpp": MethodCfg(name="infopro", addons=["man"], bridge_combine="scaled"),
    "dgl+hpff": MethodCfg(name="dgl", addons=["cascade", "pff"], cascade_final="both"),
    "infopro+hpff-decoder": MethodCfg(name="infopro", addons=["cascade", "pff"], pff_mode="decoder"),
    "dgl+mlaan": MethodCfg(name="dgl", addons=["cascade", "lam"], cascade_final="both", ema_warmup=True),
    "dgl+ckpt": MethodCfg(name="dgl", checkpoint=2),
}


def engines(cfg: MethodCfg, backend: str | Callable[..., Any]) -> tuple[LocalEngine, LocalEngine]:
    k = 1 if cfg.name == "e2e" else 3
    return make_engine(cfg, k), make_engine(cfg, k, compile=backend)


def counting(counter: list[int]) -> Callable[..., Any]:
    """A backend that counts the graphs dynamo hands it and runs each one as captured."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        counter[0] += 1
        return gm.forward

    return backend


@pytest.mark.parametrize("name", METHODS)
def test_compiled_training_equals_eager(name: str) -> None:
    """Three steps of the compiled engine land on the eager engine's parameters (fp32 tolerance): the losses, the
    aux nets, EMA copies and cascades all run under the compiled modules and objectives."""
    torch.compiler.reset()  # each test compiles from scratch
    eager, compiled = engines(METHODS[name], "aot_eager")
    for s in range(3):
        a, b = (engine.train_step(make_batch(seed=s)).figures for engine in (eager, compiled))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for (key, p), q in zip(eager.state_dict()["model"].items(), compiled.state_dict()["model"].values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=key)
    for p, q in zip(eager.method.parameters(), compiled.method.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["dgl", "infopro-contrast", "dgl+mlaan"])
def test_nothing_recompiles_after_the_first_train_and_eval_steps(name: str) -> None:
    """The first train step and the first evaluation compile each graph once (train and eval modes differ); later
    steps, evaluations and batches of the same shape reuse them."""
    torch.compiler.reset()
    counter = [0]
    engine = make_engine(METHODS[name], 3, compile=counting(counter))
    batch = make_batch()
    test = [(batch.input, batch.target)]
    engine.train_step(batch)
    engine.evaluate(test)
    engine.train_step(make_batch(seed=1))
    first = counter[0]
    assert first > 0
    for s in range(2, 5):
        engine.train_step(make_batch(seed=s))
    engine.evaluate(test)
    engine.train_step(make_batch(seed=5))
    assert counter[0] == first


def test_an_unknown_compile_backend_is_one_line_with_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown torch.compile backend 'aot_eagre'.*aot_eager"):
        make_engine(MethodCfg(name="dgl"), 2, compile="aot_eagre")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_inductor_training_equals_eager() -> None:
    """The real thing: inductor kernels built by the system compiler, DGL and InfoPro K=3 (over 5 minutes of
    compilation on a loaded 2-core CPU)."""
    for name in ("dgl", "infopro-contrast"):
        torch.compiler.reset()
        eager, compiled = engines(METHODS[name], True)
        for s in range(2):
            a, b = (engine.train_step(make_batch(seed=s)).figures for engine in (eager, compiled))
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
