"""PPLL over gloo on loopback: bitwise equal to sequential local learning, resume from per-stage checkpoints,
time-balanced splits agreed by every rank, and clear failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from locallearn.cli.main import main
from locallearn.parallel.link import free_port
from locallearn.parallel.ppll import spawn_ppll
from locallearn.train import fit, load_checkpoint, load_config
from locallearn.train.config import ConfigError
from locallearn.train.rundir import read_records

from .conftest import tiny_overrides

pytestmark = pytest.mark.timeout(240)


def ppll_base(root: Path, out: Path, method: str, k: int) -> list[str]:
    """Two epochs of 5 steps (512 = 4·120 + 32: a ragged last batch), tiny ResNet-8."""
    return tiny_overrides(root, out) + [
        f"method.name={method}",
        f"split.k={k}",
        "run.epochs=2",
        "data.batch_size=120",
        "run.threads=1",
        "model.width=4",
    ]


def assert_stages_match(reference: dict[str, Any], run_dir: str | Path, k: int, atol: float = 0.0) -> None:
    """Every stage checkpoint of a PPLL run holds the reference's (a single-process checkpoint: ``model``, ``aux``,
    ``ends``) module and aux net: bit for bit with ``atol=0``."""
    starts = [0, *reference["ends"][:-1]]

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a, b) if atol == 0 else torch.allclose(a.double(), b.double(), rtol=0, atol=atol)

    for stage in range(k):
        got = load_checkpoint(Path(run_dir) / f"ckpt_stage{stage}.pt")
        units = range(starts[stage], reference["ends"][stage])
        expected = {key: v for key, v in reference["model"].items() if int(key.split(".")[1]) in units}
        assert len(got["model"]) == len(expected)
        for (key, value), (ref_key, ref) in zip(got["model"].items(), expected.items()):
            index, rest = key.split(".", 1)
            assert ref_key == f"units.{starts[stage] + int(index)}.{rest}"
            assert same(value, ref), f"stage {stage}: {ref_key} differs by {(value - ref).abs().max().item()}"
        prefix = f"aux.{stage}."
        aux = {key[len(prefix) :]: v for key, v in reference["aux"].items() if key.startswith(prefix)}
        assert got["aux"].keys() == aux.keys()
        for name, ref in aux.items():
            assert same(got["aux"][name], ref), f"stage {stage}: aux {name} differs"


@pytest.mark.parametrize("method,k", [("dgl", 2), ("infopro", 3), ("dgl", 4)])
def test_ppll_equals_sequential_bitwise(synthetic_root: Path, tmp_path: Path, method: str, k: int) -> None:
    """Each stage's module and aux net after 10 steps (a ragged last batch included) equal the sequential
    engine's, bit for bit; evaluation matches too."""
    base = ppll_base(synthetic_root, tmp_path, method, k)
    sequential = fit(load_config(None, base), quiet=True)
    pipelined = spawn_ppll(load_config(None, base + ["parallel=ppll", f"ppll.procs={k}"]))
    seq = load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt")
    assert pipelined["step"] == seq["step"] == 10
    assert_stages_match(seq, pipelined["run_dir"], k)
    assert pipelined["test_acc"] == pytest.approx(sequential["test_acc"], abs=1e-6)
    assert pipelined["train_acc"] == pytest.approx(sequential["train_acc"], abs=1e-6)  # the same outputs, counted
    assert pipelined["lr"] == sequential["lr"]
    assert len(pipelined["busy_fraction"]) == k and all(0 < b <= 1 for b in pipelined["busy_fraction"])


def test_compiled_ppll_stages_train_as_the_eager_sequential_engine(synthetic_root: Path, tmp_path: Path) -> None:
    """``run.compile`` reaches every PPLL stage's module and aux net (aot_eager: dynamo and AOT autograd without
    code generation); the stages end where the eager sequential engine does, within fp32 rounding."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2)
    sequential = fit(load_config(None, base), quiet=True)
    compiled = ["run.compile=true", "run.compile_backend=aot_eager", "parallel=ppll", "ppll.procs=2"]
    pipelined = spawn_ppll(load_config(None, base + compiled))
    seq = load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt")
    assert pipelined["step"] == seq["step"] == 10
    assert_stages_match(seq, pipelined["run_dir"], 2, atol=1e-5)


def test_ppll_resume_continues_bitwise(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    """3 steps (stopped mid-epoch), then ``locallearn train --resume RUN_DIR`` to 10: every stage's module, aux
    net and SGD momentum continue exactly, so the result is the uninterrupted run's (= sequential LL, previous
    test), bit for bit."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2)
    first = spawn_ppll(load_config(None, base + ["parallel=ppll", "ppll.procs=2", "run.max_steps=3"]))
    stage0 = load_checkpoint(Path(first["run_dir"]) / "ckpt_stage0.pt")
    assert (stage0["epoch"], stage0["step_in_epoch"], stage0["step"]) == (0, 3, 3) and stage0["optim"]["state"]
    assert main(["train", "--resume", first["run_dir"], "run.max_steps=null"]) == 0
    sequential = load_checkpoint(Path(fit(load_config(None, base), quiet=True)["run_dir"]) / "ckpt_last.pt")
    assert load_checkpoint(Path(first["run_dir"]) / "ckpt_stage1.pt")["step"] == sequential["step"] == 10
    assert_stages_match(sequential, first["run_dir"], 2)
    assert main(["train", "--resume", first["run_dir"], "split.k=3"]) == 2  # the split may not change on resume
    assert "split.k differ from the run's config" in capsys.readouterr().err


def exit_at_call(owner: Any, name: str, call: int, code: int) -> None:
    """Make ``owner.name`` end this process with exit ``code`` when it is called for the ``call``-th time (a kill
    at a known step, inside a spawned rank)."""
    original, calls = getattr(owner, name), [0]

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            os._exit(code)
        return original(*args, **kwargs)

    setattr(owner, name, dying)


def assert_resumed_records_match(reference: str | Path, resumed: str | Path, steps: list[int]) -> None:
    """A run killed mid-epoch and resumed records what the uninterrupted ``reference`` did (every module's loss,
    train and test accuracy, bitwise) at the same ``steps``, each record timing all of its epoch's samples."""
    a, b = (read_records(Path(d) / "metrics.jsonl") for d in (reference, resumed))
    assert [r["step"] for r in a] == [r["step"] for r in b] == steps
    for x, y in zip(a, b):
        assert (y["train_loss"], y["train_acc"], y["test_acc"]) == (x["train_loss"], x["train_acc"], x["test_acc"])
        assert y["imgs_per_s"] * y["epoch_time_s"] == pytest.approx(x["train_size"], rel=1e-9)


def _stages_killed_at_step_4(rank: int, world: int, port: int, body, data: dict, out_dir: str, *rest) -> None:
    """A PPLL rank killed when it starts its fourth step (the last checkpoint was at step 2); a stage whose
    neighbour died first fails on its link instead."""
    from locallearn.parallel import launch, ppll

    exit_at_call(ppll, "stage_step", 4, 9)
    launch._spawned(rank, world, port, body, data, out_dir, *rest)


def test_ppll_killed_mid_epoch_records_the_whole_epoch_after_resume(synthetic_root: Path, tmp_path: Path) -> None:
    """Killed in step 4 of 5, resumed from the step-2 checkpoints: each epoch's record equals the uninterrupted
    run's and covers all of the epoch's samples."""
    cfg = load_config(
        None, ppll_base(synthetic_root, tmp_path, "dgl", 2) + ["parallel=ppll", "ppll.procs=2", "run.ckpt_every=2"]
    )
    full = spawn_ppll(cfg)
    run_dir = tmp_path / "killed"  # the run's folder (as a resumed run's, chosen by the caller)
    run_dir.mkdir()
    codes = run_until_exit(_stages_killed_at_step_4, cfg, 2, run_dir)
    assert codes[0] == 9 and codes[1] not in (None, 0), codes
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_resumed_records_match(full["run_dir"], run_dir, [5, 10])


def test_time_balanced_split_is_measured_once_and_shared(synthetic_root: Path, tmp_path: Path) -> None:
    """``split.balance=time``: rank 0 measures, every rank builds the broadcast split, and the saved config holds
    explicit ends (a resume does not measure again)."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2)
    result = spawn_ppll(load_config(None, base + ["parallel=ppll", "ppll.procs=2", "split.balance=time"]))
    ends = [load_checkpoint(Path(result["run_dir"]) / f"ckpt_stage{s}.pt")["ends"] for s in range(2)]
    saved = load_config(Path(result["run_dir"]) / "config.yaml")
    assert ends[0] == ends[1] == result["ends"] == saved.split.ends and saved.split.preset == "ends"


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["method.name=glcan", "method.glcan_global=ema"], "glcan_global=per_module"),
        (["method.addons=[cascade]", "run.precision=fp16"], "run.precision=bf16 or fp32"),
        (["method.addons=[lam]", "method.legacy=[last_ema_only]"], "last_ema_only"),
    ],
)
def test_ppll_refuses_what_it_cannot_run_faithfully(
    synthetic_root: Path, tmp_path: Path, extra: list[str], fragment: str
) -> None:
    from locallearn.parallel.cross_stage import check_supported
    from locallearn.train.build import build_engine, build_loaders

    cfg = load_config(None, ppll_base(synthetic_root, tmp_path, "dgl", 2) + extra)
    _, test, spec = build_loaders(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match=fragment):
        check_supported(build_engine(cfg, spec, torch.device("cpu"), next(iter(test))[0][:8]))


def test_a_wrong_process_count_is_one_config_error(synthetic_root: Path, tmp_path: Path) -> None:
    """Raised in the spawned ranks, it reaches the caller as the same one-line ConfigError."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 3) + ["parallel=ppll", "ppll.procs=2", "run.max_steps=1"]
    with pytest.raises(ConfigError, match="K=3 modules × ppll.replicas=1 needs 3 processes, got 2"):
        spawn_ppll(load_config(None, base))


def _timed_stages(cfg, out_dir: str, resume: bool) -> dict | None:
    """PPLL's rank body, with the last stage slowed down (0.2 s per step) and the wall time at which every rank
    enters each step written to ``out_dir/enter{rank}.json``."""

    import torch.distributed as dist

    from locallearn.parallel import ppll

    rank, original, enter = dist.get_rank(), ppll.stage_step, []

    def timed(engine, k, x, batch, link, step, cross=None):
        enter.append(time.time())
        if k == engine.k - 1:
            time.sleep(0.2)
        return original(engine, k, x, batch, link, step, cross)

    ppll.stage_step = timed
    result = ppll.run_stage(cfg, out_dir, resume)
    (Path(out_dir) / f"enter{rank}.json").write_text(json.dumps(enter))
    return result


def test_back_pressure_bounds_how_far_a_stage_runs_ahead(synthetic_root: Path, tmp_path: Path) -> None:
    """With ``ppll.window=1`` and a slow last stage, stage 0 enters step i only after stage 1 has received the
    activation of step i-2 (so at most the window's message is in flight), and nothing deadlocks."""

    from locallearn.parallel.launch import spawn

    cfg = load_config(None, ppll_base(synthetic_root, tmp_path, "dgl", 2) + ["parallel=ppll", "ppll.window=1"])
    spawn(_timed_stages, cfg, 2, str(tmp_path))
    first, last = (json.loads((tmp_path / f"enter{r}.json").read_text()) for r in range(2))
    assert len(first) == len(last) == 10
    # Stage 1 stamps a step after its receive returns, so a loaded machine can delay the stamp past the moment
    # stage 0 is released; running one step further ahead would show as >= 0.2 s (the slow stage's sleep).
    assert all(first[i] >= last[i - 2] - 0.1 for i in range(2, 10)), (first, last)
    assert first[4] < last[4]  # while still running ahead of the slow stage


def _stage_that_dies(rank: int, world: int, port: int, body, data: dict, out_dir: str, resume: bool, queue) -> None:
    """Rank 1 joins the group and then dies at once; the others must fail fast, not hang."""
    import torch.distributed as dist

    from locallearn.parallel import launch

    if rank == 1:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        os._exit(3)
    launch._spawned(rank, world, port, body, data, out_dir, resume, queue)


def run_until_exit(target, cfg, world: int, out: Path, limit: float = 90) -> list[int | None]:
    """Start ``target`` (``launch._spawned``'s signature) on ``world`` ranks running PPLL's stage body; every
    rank's exit code once all have exited, or None for one still running after ``limit`` s (then killed)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from locallearn.parallel import data_parallel, ppll
    from locallearn.train.config import to_dict

    start = time.perf_counter()
    body = ppll.run_stage if cfg.parallel == "ppll" else data_parallel.run_dp
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)  # as launch.spawn does
    args = (world, store.port, body, to_dict(cfg), str(out), False, None)
    context = mp.start_processes(target, args=args, nprocs=world, join=False, start_method="spawn")
    while any(p.exitcode is None for p in context.processes) and time.perf_counter() - start < limit:
        time.sleep(0.2)
    codes = [p.exitcode for p in context.processes]
    for p in context.processes:
        if p.exitcode is None:
            p.kill()
    return codes


def _rank_counting_its_batches(rank: int, world: int, port: int, body, data: dict, out_dir: str, *rest) -> None:
    """A PPLL rank that writes how many batches its own loaders yielded to ``reads_rank{rank}``."""
    from locallearn.data.loader import ResidentLoader
    from locallearn.parallel import launch

    original, reads = ResidentLoader.batches, [0]

    def counted(self, epoch: int = 0, start: int = 0):
        for item in original(self, epoch, start):
            reads[0] += 1
            yield item

    ResidentLoader.batches = counted
    launch._spawned(rank, world, port, body, data, out_dir, *rest)
    (Path(out_dir) / f"reads_rank{rank}").write_text(str(reads[0]))


@pytest.mark.parametrize("labels", ["send", "loader"])
def test_labels_sent_with_the_activations_train_the_same_model(
    synthetic_root: Path, tmp_path: Path, labels: str
) -> None:
    """``ppll.labels=send``: stage 0 alone reads batches; targets and raw images (InfoPro's decoders reconstruct
    them on every stage) travel with the activations, through a ragged last batch and the evaluation passes, and
    the run is still the sequential engine's bit for bit. ``loader`` (the default) reads on every stage."""

    base = ppll_base(synthetic_root, tmp_path, "infopro", 3)
    sequential = fit(load_config(None, base), quiet=True)
    cfg = load_config(None, base + ["parallel=ppll", f"ppll.labels={labels}", "ppll.timeout=60"])
    run_dir = tmp_path / "ppll_run"
    run_dir.mkdir()
    assert run_until_exit(_rank_counting_its_batches, cfg, 3, run_dir, limit=180) == [0, 0, 0]
    reads = [int((run_dir / f"reads_rank{r}").read_text()) for r in range(3)]
    assert reads[0] > 10  # 10 training batches, 2 evaluation passes and the sample that builds the engine
    assert reads[1:] == ([1, 1] if labels == "send" else [reads[0]] * 2)  # later stages: only that sample
    assert_stages_match(load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt"), run_dir, 3)
    last = read_records(run_dir / "metrics.jsonl")[-1]
    assert last["test_acc"] == pytest.approx(sequential["test_acc"], abs=1e-6)
    assert last["aux_acc"] == pytest.approx(sequential["aux_acc"], abs=1e-6)


def test_pinned_ranks_run_on_cores_of_their_own(synthetic_root: Path, tmp_path: Path) -> None:
    """``ppll.pin_cores=true`` with one thread per rank: rank 0 runs on the first core alone (where the machine
    has a core per rank), and training is unchanged by it (bitwise the sequential engine)."""

    base = ppll_base(synthetic_root, tmp_path, "dgl", 2) + ["run.threads=1"]
    sequential = fit(load_config(None, base), quiet=True)
    result = spawn_ppll(load_config(None, base + ["parallel=ppll", "ppll.pin_cores=true"]), 2, timeout=120)
    env = json.loads((Path(result["run_dir"]) / "env.json").read_text())
    cores = sorted(os.sched_getaffinity(0))
    assert env["rank0_cores"] == (cores[:1] if len(cores) >= 2 else cores)
    assert_stages_match(load_checkpoint(Path(sequential["run_dir"]) / "ckpt_last.pt"), Path(result["run_dir"]), 2)


def test_a_dead_stage_makes_every_other_rank_exit_nonzero(synthetic_root: Path, tmp_path: Path, capfd) -> None:
    """Rank 1 dies right after joining; ranks 0 and 2 must each exit non-zero on their own (not be killed by the
    launcher) within a bounded time, naming the stage that died: no silent hang."""
    overrides = ["method.name=dgl", "split.k=3", "parallel=ppll", "ppll.timeout=30"]
    cfg = load_config(None, tiny_overrides(synthetic_root, tmp_path) + overrides)
    codes = run_until_exit(_stage_that_dies, cfg, 3, tmp_path)
    assert codes[1] == 3 and codes[0] not in (None, 0) and codes[2] not in (None, 0), codes
    err = capfd.readouterr().err
    assert err.count("stage 1 died or hangs (no heartbeat)") == 2, err[-3000:]


def test_torchrun_trains_and_resumes(synthetic_root: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m locallearn train ... parallel=ppll``, stopped after 3 steps, then
    ``torchrun ... train --resume RUN_DIR``: the same parameters as sequential local learning."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (tmp_path / "empty.yaml").write_text("{}\n")  # the defaults; the overrides say the rest
    cmd = [*torchrun, "-m", "locallearn", "train", "-c", str(tmp_path / "empty.yaml"), *base, "parallel=ppll"]
    cmd.append("run.max_steps=3")
    subprocess.run(cmd, check=True, timeout=150, env=env, capture_output=True)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("_ppll")]
    cmd = [*torchrun, "-m", "locallearn", "train", "--resume", str(run_dir), "run.max_steps=null"]
    subprocess.run(cmd, check=True, timeout=150, env=env, capture_output=True)
    sequential = load_checkpoint(Path(fit(load_config(None, base), quiet=True)["run_dir"]) / "ckpt_last.pt")
    assert_stages_match(sequential, run_dir, 2)


def test_two_nodes_meet_through_torchrun_rendezvous(synthetic_root: Path, tmp_path: Path) -> None:
    """Multi-node PPLL: two ``torchrun --nnodes 2 --nproc-per-node 1`` agents (here on one host, as on two machines)
    meet through the c10d rendezvous; node 0 runs stage 0, node 1 stage 1 (both with ``LOCAL_RANK=0``), and the
    stages end bitwise equal to sequential local learning."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2)
    (tmp_path / "empty.yaml").write_text("{}\n")
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in range(2):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        torchrun += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "locallearn-test"]
        cmd = [*torchrun, "-m", "locallearn", "train", "-c", str(tmp_path / "empty.yaml"), *base, "parallel=ppll"]
        log = (tmp_path / f"node{node}.log").open("w")
        nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=180) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-2000:] for n in range(2))
    assert codes == [0, 0], logs
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("_ppll")]
    sequential = load_checkpoint(Path(fit(load_config(None, base), quiet=True)["run_dir"]) / "ckpt_last.pt")
    assert_stages_match(sequential, run_dir, 2)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc (Linux)")
def test_killing_a_rank_ends_the_run_in_one_line_naming_it_and_the_resume(synthetic_root: Path, tmp_path: Path) -> None:
    """``locallearn train ... parallel=ppll ppll.procs=2``; rank 1 gets SIGKILL mid-training. The command must end
    within 60 s with one error line naming the rank, its signal, the last checkpoint and the resume command, no
    traceback, and no rank left running."""
    base = ppll_base(synthetic_root, tmp_path, "dgl", 2)
    (tmp_path / "empty.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "locallearn", "train", "-c", str(tmp_path / "empty.yaml"), *base]
    cmd += ["parallel=ppll", "ppll.procs=2", "run.epochs=200", "run.ckpt_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("*_ppll/ckpt_stage1.pt")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        ranks = [c for c in _children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(ranks) == 2 and proc.poll() is None, f"ranks {ranks}, exit {proc.poll()}"
        victim = sorted(ranks)[1]  # spawned in rank order
        os.kill(victim, 9)
        start = time.time()
        _, err = proc.communicate(timeout=60)
        assert time.time() - start < 60
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    run_dir = next(tmp_path.glob("*_ppll"))
    assert last.startswith("locallearn: error: rank 1 ") and "killed by SIGKILL" in last, last
    assert "ckpt_stage" in last and f"locallearn train --resume {run_dir}" in last, last
    assert not any(_alive(pid) for pid in ranks)
