"""PPLL over gloo on loopback: bitwise equal to sequential local learning, and clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locallearn.parallel.ppll import spawn_ppll
from locallearn.train import fit, load_checkpoint, load_config

from .conftest import tiny_overrides

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("method,k", [("dgl", 2), ("infopro", 3), ("dgl", 4)])
def test_ppll_equals_sequential_bitwise(synthetic_root: Path, tmp_path: Path, method: str, k: int) -> None:
    """Each stage's module and aux net after 11 steps (a ragged last batch included: 512 = 4·120 + 32) equal
    the sequential engine's, bit for bit; evaluation matches too."""
    base = tiny_overrides(synthetic_root, tmp_path) + [
        f"method.name={method}",
        f"method.k={k}",
        "run.epochs=2",
        "data.batch_size=120",
        "run.threads=1",
        "model.width=4",
    ]
    sequential = fit(load_config(None, base), quiet=True)
    pipelined = spawn_ppll(load_config(None, base + ["parallel=ppll", f"ppll.procs={k}"]))
    seq = load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt")
    assert pipelined["step"] == seq["step"] == 10
    starts = [0, *seq["ends"][:-1]]
    for stage in range(k):
        got = load_checkpoint(Path(pipelined["run_dir"]) / f"ckpt_stage{stage}.pt")
        units = range(starts[stage], seq["ends"][stage])
        expected = {key: v for key, v in seq["model"].items() if int(key.split(".")[1]) in units}
        assert len(got["model"]) == len(expected)
        for (key, value), (ref_key, ref) in zip(got["model"].items(), expected.items()):
            index, rest = key.split(".", 1)
            assert ref_key == f"units.{starts[stage] + int(index)}.{rest}"
            assert torch.equal(value, ref), f"stage {stage}: {ref_key} differs from sequential"
        aux = {key[len(f"aux.{stage}.") :]: v for key, v in seq["aux"].items() if key.startswith(f"aux.{stage}.")}
        assert got["aux"].keys() == aux.keys() and all(torch.equal(got["aux"][n], aux[n]) for n in aux)
    assert pipelined["test_acc"] == pytest.approx(sequential["test_acc"], abs=1e-6)


def test_ppll_refuses_what_it_cannot_run(synthetic_root: Path, tmp_path: Path) -> None:
    base = tiny_overrides(synthetic_root, tmp_path) + [
        "method.name=dgl",
        "method.k=2",
        "parallel=ppll",
        "ppll.procs=2",
        "run.max_steps=1",
    ]
    with pytest.raises(Exception, match="cascade"):
        spawn_ppll(load_config(None, base + ["method.addons=[cascade]"]))
    with pytest.raises(Exception, match="one process per module"):
        spawn_ppll(load_config(None, base + ["method.k=3"]))


def _stage_that_dies(rank: int, world: int, port: int, data: dict, out_dir: str, queue) -> None:
    """Rank 1 joins the group and then dies at once; the others must fail fast, not hang."""
    import os

    import torch.distributed as dist

    from locallearn.parallel import ppll

    if rank == 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        os._exit(3)
    ppll._spawned(rank, world, port, data, out_dir, queue)


def test_a_dead_stage_makes_every_other_rank_exit_nonzero(synthetic_root: Path, tmp_path: Path) -> None:
    """Rank 1 dies right after joining; ranks 0 and 2 must each exit non-zero on their own (not be killed by the
    launcher) within a bounded time: no silent hang."""
    import time

    import torch.multiprocessing as mp

    from locallearn.parallel import ppll
    from locallearn.train.config import to_dict

    cfg = load_config(
        None,
        tiny_overrides(synthetic_root, tmp_path)
        + ["method.name=dgl", "method.k=3", "parallel=ppll", "ppll.timeout=30"],
    )
    start = time.perf_counter()
    context = mp.start_processes(
        _stage_that_dies,
        args=(3, ppll._free_port(), to_dict(cfg), str(tmp_path), None),
        nprocs=3,
        join=False,
        start_method="spawn",
    )
    while any(p.exitcode is None for p in context.processes) and time.perf_counter() - start < 90:
        time.sleep(0.2)
    codes = [p.exitcode for p in context.processes]
    for p in context.processes:
        if p.exitcode is None:
            p.kill()
    assert codes[1] == 3 and codes[0] not in (None, 0) and codes[2] not in (None, 0), codes
