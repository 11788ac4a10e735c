"""Shared fixtures: one thread per process (robust on shared 2-core machines), and a small learnable dataset
written as real Fashion-MNIST IDX files, so the whole pipeline runs without the Debian package."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from locallearn.data import DataError

torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def synthetic_images(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Class c = stripes of orientation c % 2 and period 2 + c // 2 at a random phase, on noise: translation and
    flip invariant (like real classes, so a CNN with global pooling can learn it) and learnt in a few dozen steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    coords = np.arange(size)
    images = rng.integers(0, 50, (n, size, size))
    for i, c in enumerate(labels):
        period = 2 + int(c) // 2
        on = ((coords + rng.integers(0, period)) % period) < (period + 1) // 2
        images[i] += 150 * (on[:, None] if c % 2 == 0 else on[None, :])
    return images.astype(np.uint8), labels


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic-fmnist")
    for prefix, n, seed in (("train", 512, 0), ("t10k", 256, 1)):
        images, labels = synthetic_images(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def tiny_overrides(root: Path, out: Path) -> list[str]:
    """A fast config on the synthetic data: ResNet-8 of width 8, 16×16 inputs, batch 64."""
    return [
        f"data.root={root}",
        "data.limit_train=null",  # (a preset's limits exceed the synthetic set: all of it)
        "data.limit_test=null",
        "data.batch_size=64",
        "data.eval_batch_size=128",
        "data.flip=false",
        "model.name=resnet8",
        "model.width=8",
        "optim.lr=0.05",
        "run.epochs=2",
        f"run.out={out}",
        "run.progress=false",
    ]


def one_line_data_error(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    """The raised error is a one-line DataError containing every fragment (file name, problem, fix)."""
    msg = str(exc.value)
    assert isinstance(exc.value, DataError) and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def assert_grads_of_isolated_losses(engine, reference, batch) -> None:
    """After ``engine.train_step(batch)`` (lr 0, step at the end), each module's accumulated gradient equals the
    gradient of its own local loss alone, computed on ``reference`` (a deep copy taken before the step) with every
    module input detached (a captured model's carry too): nothing else reached it."""
    from locallearn.models.units import detach_carry

    h = batch.input
    for j, module in enumerate(reference.modules):
        out = module(h)
        params = reference.module_parameters(j)
        grads = torch.autograd.grad(reference.method.local_loss(j, out, batch), params, allow_unused=True)
        for p_engine, g in zip(engine.module_parameters(j), grads):
            expected = torch.zeros_like(p_engine) if g is None else g
            got = torch.zeros_like(p_engine) if p_engine.grad is None else p_engine.grad
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        h = detach_carry(out)


def assert_ppll_equals_sequential(base: list[str], steps: int | None = None) -> None:
    """``base`` (a captured model's config overrides) trained by the sequential engine and by PPLL on 2 ranks:
    each stage's weights (keys mapped back to the model's own) and aux nets are bitwise the sequential ones, and
    the test accuracy is the same."""
    from locallearn.parallel.ppll import spawn_ppll
    from locallearn.train import fit, load_checkpoint, load_config

    sequential = fit(load_config(None, base), quiet=True)
    pipelined = spawn_ppll(load_config(None, base + ["parallel=ppll", "ppll.procs=2"]))
    reference = load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt")
    assert pipelined["step"] == reference["step"] == (steps or reference["step"]) > 0
    for stage in range(2):
        got = load_checkpoint(Path(pipelined["run_dir"]) / f"ckpt_stage{stage}.pt")
        assert got["model"]
        for key, value in got["model"].items():
            original = key.split(".model.", 1)[1]  # "<unit>.train_graph.model.enc1.0.weight" → "enc1.0.weight"
            assert torch.equal(value, reference["model"][original]), f"stage {stage}: {original} differs"
        prefix = f"aux.{stage}."
        for name, ref in ((k[len(prefix) :], v) for k, v in reference["aux"].items() if k.startswith(prefix)):
            assert torch.equal(got["aux"][name], ref), f"stage {stage}: aux {name} differs"
    assert pipelined["test_acc"] == pytest.approx(sequential["test_acc"], abs=1e-6)


def learn_on_fashion_mnist(preset: str, overrides: list[str], out: Path) -> float:
    """Test accuracy after 64 DGL steps (2 epochs of 2,048 real Fashion-MNIST images, batch 64) of ``preset`` with
    ``overrides``. torch's global generator, which dropout and drop path draw from and which ``fit`` leaves as it
    is, is seeded first, so the number does not depend on the tests that ran before."""
    from locallearn.train import fit, load_config

    common = ["data.limit_train=2048", "data.batch_size=64", "data.limit_test=500", "run.epochs=2", "run.threads=1"]
    cfg = load_config(preset, [*common, f"run.out={out}", "run.progress=false", *overrides])
    torch.manual_seed(0)
    return fit(cfg, quiet=True)["test_acc"]
