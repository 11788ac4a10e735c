"""The one trainer: interrupts that lose nothing (SIGINT, SIGTERM: a checkpoint at the current step and the real
command to continue), step records (console, metrics.jsonl, TensorBoard), resume that says where it continues,
``--resume auto``, and a longer ``run.epochs`` on resume said out loud."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from locallearn.cli.main import main
from locallearn.parallel.ppll import spawn_ppll
from locallearn.train import fit, load_checkpoint, load_config
from locallearn.train.interrupt import Interrupted
from locallearn.train.rundir import read_records
from locallearn.train.runtime import LocalRuntime

from .conftest import tiny_overrides


def base(root: Path, out: Path) -> list[str]:
    """DGL K=2, two epochs of 8 steps (512 samples, batch 64)."""
    return [*tiny_overrides(root, out), "method.name=dgl", "split.k=2", "run.threads=1", "model.width=4"]


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_current_step_and_the_run_resumes_exactly(
    synthetic_root: Path, tmp_path: Path, monkeypatch, how: signal.Signals
) -> None:
    """The signal arrives inside step 11 (epoch 2): the trainer finishes that step, saves, and raises
    Interrupted naming epoch, step and the resume command; resuming ends with the uninterrupted run's records."""
    reference = fit(load_config(None, base(synthetic_root, tmp_path / "ref")), quiet=True)
    original = LocalRuntime.step

    def step(self, item, index):
        if index == 10:
            os.kill(os.getpid(), how)
        return original(self, item, index)

    monkeypatch.setattr(LocalRuntime, "step", step)
    before = signal.getsignal(how)
    with pytest.raises(Interrupted) as info:
        fit(load_config(None, base(synthetic_root, tmp_path / "run")), quiet=True)
    run_dir = info.value.run_dir
    assert (info.value.epoch, info.value.step) == (2, 11)
    assert str(info.value).endswith(f"continue with: locallearn train --resume {run_dir}")
    assert (
        signal.getsignal(how) == before and load_checkpoint(run_dir / "ckpt_last.pt")["step"] == 11
    )  # handlers restored
    monkeypatch.setattr(LocalRuntime, "step", original)
    resumed = fit(resume=run_dir, quiet=True)
    a, b = read_records(Path(reference["run_dir"]) / "metrics.jsonl"), read_records(Path(run_dir) / "metrics.jsonl")
    assert [(r["step"], r["train_loss"], r["train_acc"], r["test_acc"]) for r in a] == [
        (r["step"], r["train_loss"], r["train_acc"], r["test_acc"]) for r in b
    ]
    assert resumed["test_acc"] == reference["test_acc"]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_a_signal_on_the_command_line_prints_the_real_resume_command(
    synthetic_root: Path, tmp_path: Path, how: str
) -> None:
    """A real ``locallearn train`` process gets SIGINT (Ctrl-C) or SIGTERM (a batch system) mid-run: exit 130, one
    line with the real run folder; ``--resume`` says where it continues and a different ``run.epochs`` is noted; a
    finished run says so, exit 0."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "locallearn", "train", "-c", "configs/smoke/fmnist_dgl_k3.yaml"]
    cmd += [*base(synthetic_root, out), "run.epochs=500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*/metrics.jsonl")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    (run_dir,) = list(out.iterdir())
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"locallearn: interrupted by {how} at epoch ") and last.endswith(
        f"continue with: locallearn train --resume {run_dir}"
    ), last
    step = load_checkpoint(run_dir / "ckpt_last.pt")["step"]
    assert f", step {step}; " in last
    epoch = load_checkpoint(run_dir / "ckpt_last.pt")["epoch"]
    done = subprocess.run(
        [sys.executable, "-m", "locallearn", "train", "--resume", str(run_dir), f"run.epochs={epoch + 1}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"continuing {run_dir} at epoch {epoch + 1}, step {step}" in done.stdout
    assert f"note: run.epochs 500 → {epoch + 1}: the lr schedule is recomputed" in done.stdout
    again = subprocess.run(
        [sys.executable, "-m", "locallearn", "train", "--resume", str(run_dir)], capture_output=True, text=True
    )
    assert again.returncode == 0 and f"{run_dir} is finished (epoch {epoch + 1} of {epoch + 1}" in again.stdout


def test_step_records_reach_the_console_jsonl_and_tensorboard(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = load_config(None, [*base(synthetic_root, tmp_path), "log.every=3", "log.tensorboard=true"])
    result = fit(cfg)
    steps = read_records(Path(result["run_dir"]) / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == [3, 6, 9, 12, 15]
    assert all(len(r["train_loss"]) == 2 and r["imgs_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert [r["step"] for r in read_records(Path(result["run_dir"]) / "metrics.jsonl")] == [8, 16]  # epochs
    out = capsys.readouterr().out
    assert "  step      3  epoch   1  lr " in out and "  step     15  epoch   2" in out
    acc = event_accumulator.EventAccumulator(str(Path(result["run_dir"]) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("step/train_loss/module_1")] == [3, 6, 9, 12, 15]
    assert [e.step for e in acc.Scalars("train_loss/module_1")] == [8, 16]


def test_step_records_by_default_follow_the_first_steps_speed(synthetic_root: Path, tmp_path: Path) -> None:
    """``log.every: null``: the cadence that takes ``log.seconds`` at the first 5 steps' speed (here: every step)."""
    cfg = load_config(None, [*base(synthetic_root, tmp_path), "log.seconds=1e-9"])
    result = fit(cfg, quiet=True)
    assert [r["step"] for r in read_records(Path(result["run_dir"]) / "metrics.jsonl", "step")] == list(range(5, 17))
    cfg = load_config(None, [*base(synthetic_root, tmp_path), "log.every=0", "log.seconds=1e-9"])
    assert not read_records(Path(fit(cfg, quiet=True)["run_dir"]) / "metrics.jsonl", "step")


def test_resume_auto_continues_the_latest_run_of_the_same_name(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    argv = ["train", "-c", "configs/smoke/fmnist_dgl_k3.yaml", *base(synthetic_root, tmp_path), "run.name=mine"]
    assert main([*argv, "run.max_steps=3", "--resume", "auto"]) == 0
    assert "starting a new one" in capsys.readouterr().out
    (run_dir,) = list(tmp_path.iterdir())
    assert main([*argv, "--resume", "auto"]) == 0
    assert f"continuing {run_dir} at epoch 1, step 3" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [run_dir] and load_checkpoint(run_dir / "ckpt_last.pt")["step"] == 16


def test_ppll_writes_step_records_with_every_stage_loss(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = load_config(None, [*base(synthetic_root, tmp_path), "parallel=ppll", "log.every=4"])
    result = spawn_ppll(cfg, 2, timeout=240)
    steps = read_records(Path(result["run_dir"]) / "metrics.jsonl", "step")
    assert [r["step"] for r in steps] == [4, 8, 12, 16] and all(len(r["train_loss"]) == 2 for r in steps)
    assert Path(result["run_dir"]).name.endswith("_ppll")


def unet_run(root: Path, out: Path) -> list[str]:
    """The test U-Net (skips across the cut) cut after enc3: K=2, one epoch of 5 steps."""
    return [
        *tiny_overrides(root, out),
        "model.name=tests.user_models:unet",
        "model.kwargs.width=4",
        "method.name=dgl",
        "split.cuts=[enc3]",
        "run.epochs=2",
        "data.batch_size=120",
        "run.threads=1",
    ]


def test_best_checkpoint_and_export_load_strictly_into_the_users_class(synthetic_root: Path, tmp_path: Path) -> None:
    """``ckpt_best.pt`` holds the epoch with the highest test accuracy; ``locallearn export`` writes a plain
    state_dict with the U-Net's own keys, from a single-process and a PPLL run alike (PPLL ≡ sequential: equal)."""
    import torch

    from tests import user_models

    single = fit(load_config(None, unet_run(synthetic_root, tmp_path / "one")), quiet=True)
    run_dir = Path(single["run_dir"])
    accs = [r["test_acc"] for r in read_records(run_dir / "metrics.jsonl")]
    best = load_checkpoint(run_dir / "ckpt_best.pt")
    assert best["best"]["value"] == max(accs) and best["epoch"] == best["best"]["epoch"] == 1 + accs.index(max(accs))
    pipelined = spawn_ppll(load_config(None, [*unet_run(synthetic_root, tmp_path / "two"), "parallel=ppll"]), 2)
    assert (Path(pipelined["run_dir"]) / "ckpt_best_stage1.pt").is_file()
    exported = {}
    for name, run in (("one", run_dir), ("two", Path(pipelined["run_dir"]))):
        assert main(["export", str(run), "--out", str(tmp_path / f"{name}.pt")]) == 0
        exported[name] = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        model = user_models.unet(width=4)
        model.load_state_dict(exported[name], strict=True)  # the original class, keys unchanged
    assert exported["one"].keys() == exported["two"].keys()
    assert all(torch.equal(exported["one"][key], exported["two"][key]) for key in exported["one"])
    assert main(["export", str(run_dir), "--best", "--out", str(tmp_path / "best.pt")]) == 0
    assert main(["eval", str(run_dir), "--best"]) == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["run.device=gpu"], "run.device=gpu is not a device name; use cpu, cuda, cuda:N or auto"),
        (["data.batch_size=4096"], "data.batch_size=4096 is larger than the 512 training samples; use at most 512"),
        (["data.limit_train=999999"], "data.limit_train=999999 but fashion_mnist has 512 train samples"),
        (["data.limit_test=5000"], "data.limit_test=5000 but fashion_mnist has 256 test samples"),
    ],
)
def test_bad_run_input_is_one_line_exit_2_before_training(
    synthetic_root: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    argv = ["train", "-c", "configs/smoke/fmnist_dgl_k3.yaml", *base(synthetic_root, tmp_path), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("locallearn: error:") and "\n" not in err and message in err, err
    assert not list(tmp_path.glob("*/metrics.jsonl"))


def test_a_file_that_is_no_checkpoint_is_refused_without_torchs_advice(tmp_path: Path, capsys) -> None:
    """torch's own message suggests weights_only=False (which would run the file's code): never shown."""
    for content in (b"not a checkpoint at all", b"PK\x03\x04garbage"):
        (tmp_path / "ckpt_last.pt").write_bytes(content)
        assert main(["train", "--resume", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "not a locallearn checkpoint" in err and "weights_only" not in err and "\n" not in err, err


def test_labels_beyond_the_class_count_are_one_line() -> None:
    import torch

    from locallearn import Batch, ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model

    engine = LocalEngine(
        create_model("resnet8", num_classes=5, in_channels=1, width=4),
        MethodCfg(name="dgl"),
        ClassificationTask(5),
        OptimCfg(),
        split=2,
    )
    batch = Batch(torch.randn(8, 1, 16, 16), torch.arange(8))
    with pytest.raises(ValueError, match=r"labels run from 0 to 7 but ClassificationTask\(5\) has classes 0..4; use "):
        engine.train_step(batch)


def test_aux_nets_larger_than_the_backbone_draw_a_warning(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    cfg = load_config(None, [*base(synthetic_root, tmp_path), "split.k=4", "method.addons=[man]", "run.max_steps=1"])
    fit(cfg, quiet=True)
    err = capsys.readouterr().err
    assert "locallearn: warning: the aux nets hold " in err and "× the backbone's parameters" in err, err


def test_version_list_and_table_formats(capsys) -> None:
    from locallearn.bench.report import load_text
    from locallearn.cli.commands import seconds

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("locallearn 0.")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "add-ons:  man, lam, pff, cascade" in out and "mlaan = addons=cascade+lam" in out
    assert "  fmnist/: demo," in out  # the presets of configs/
    assert (seconds(0.43), seconds(9.96), seconds(107.4)) == ("0.4", "10.0", "107")
    assert load_text([0.5234375, 1.0, 2.125]) == "0.52 / 1.00 / 2.12" and load_text(None) == "?"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("parallel", ["ppll", "dp"])
def test_ctrl_c_stops_every_rank_at_one_step_with_a_checkpoint(
    synthetic_root: Path, tmp_path: Path, parallel: str
) -> None:
    """Ctrl-C reaches the launcher and every spawned rank: they agree on one step, each saves its part there, and
    the command ends with exit 130 and the real resume command; the resumed run continues from that step."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "locallearn", "train", "-c", "configs/smoke/fmnist_dgl_k3.yaml"]
    cmd += [*base(synthetic_root, out), "run.epochs=500", f"parallel={parallel}", "ppll.procs=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list(out.glob("*/metrics.jsonl")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the launcher and both ranks
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert last.startswith("locallearn: interrupted by SIGINT at epoch ") and last.endswith(
        f"continue with: locallearn train --resume {run_dir}"
    ), last
    files = ["ckpt_stage0.pt", "ckpt_stage1.pt"] if parallel == "ppll" else ["ckpt_last.pt"]
    steps = {load_checkpoint(run_dir / name)["step"] for name in files}
    assert len(steps) == 1 and f", step {steps.pop()}; " in last
    epoch = load_checkpoint(run_dir / files[0])["epoch"]
    done = subprocess.run(
        [sys.executable, "-m", "locallearn", "train", "--resume", str(run_dir), f"run.epochs={epoch + 1}"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and f"continuing {run_dir} at epoch {epoch + 1}" in done.stdout, done.stderr[-2000:]


def test_a_multi_process_runtime_checkpoints_by_an_agreed_step_count(
    synthetic_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """Ranks cannot each read their clock: ``run.ckpt_minutes`` becomes a step count measured on the first 5 steps
    and agreed (here a one-process runtime that plays a rank: ``solo`` off, ``agree`` its own value); a tiny
    interval saves after every step from the 5th on, each mid-epoch save with the carry of its epoch."""
    saves: list[tuple[int, bool]] = []
    original = LocalRuntime.save

    def save(self, position, carry, name="last"):
        if name == "last":
            saves.append((position["step"], carry is not None))
        return original(self, position, carry, name)

    monkeypatch.setattr(LocalRuntime, "solo", False)
    monkeypatch.setattr(LocalRuntime, "save", save)
    fit(load_config(None, [*base(synthetic_root, tmp_path), "run.ckpt_minutes=1e-9", "log.every=0"]), quiet=True)
    assert [step for step, mid in saves if mid] == list(range(5, 17))
    assert [step for step, mid in saves if not mid] == [8, 16]  # the epoch ends


def loaders(root: Path, batch: int = 64) -> tuple[Any, Any]:
    """The synthetic Fashion-MNIST files as torch DataLoaders over TensorDatasets, as a user would write them."""
    from torch.utils.data import DataLoader, TensorDataset

    from locallearn.data.datasets import load_split

    out = []
    for split, shuffle in (("train", True), ("test", False)):
        images, labels = load_split("fashion_mnist", str(root), split)
        x = torch.as_tensor(images).float().div(255).sub(0.286).div(0.353)
        out.append(DataLoader(TensorDataset(x, torch.as_tensor(labels)), batch_size=batch, shuffle=shuffle))
    return out[0], out[1]


def test_fit_takes_your_model_and_dataloaders_with_schedule_logs_and_exact_resume(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """``fit(cfg, model=, train_loader=, test_loader=)``: the cosine schedule is applied (the lr falls), metrics
    and checkpoints are written, and a run stopped early and resumed with a fresh model and the same loaders ends
    with the weights of the uninterrupted run, bitwise (each epoch's shuffling is seeded by the run)."""
    from tests import user_models

    train, test = loaders(synthetic_root)
    overrides = ["method.name=dgl", "split.cuts=[enc3]", "optim.lr=0.05", "run.epochs=2", "run.progress=false"]

    def run(out: Path, *extra: str, resume: str | None = None) -> dict:
        torch.manual_seed(0)
        cfg = load_config(None, [*overrides, f"run.out={out}", *extra])
        model = user_models.unet(width=4)
        return fit(cfg, model=model, train_loader=train, test_loader=test, resume=resume, quiet=True)

    full = run(tmp_path / "full")
    records = read_records(Path(full["run_dir"]) / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["lr"] < records[0]["lr"] < 0.05
    assert 0 <= full["test_acc"] <= 1 and len(full["aux_acc"]) == 1
    assert Path(full["run_dir"]).name.endswith("_UNet_dgl_k2")
    stopped = run(tmp_path / "part", "run.max_steps=11")
    resumed = run(tmp_path / "part", resume=stopped["run_dir"])
    a = load_checkpoint(Path(full["run_dir"]) / "ckpt_last.pt")["model"]
    b = load_checkpoint(Path(resumed["run_dir"]) / "ckpt_last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_fit_takes_a_dataset_or_tensors_batched_by_the_config(synthetic_root: Path, tmp_path: Path) -> None:
    """Tensors ``(x, y)`` and a ``Dataset`` train like the DataLoader the config's batch sizes make of them: the
    same weights, bitwise (training shuffled by the run's seeded order), with the schedule applied."""
    from torch.utils.data import TensorDataset

    from tests import user_models

    train, test = loaders(synthetic_root)
    x, y = train.dataset.tensors
    overrides = ["method.name=dgl", "split.k=2", "data.batch_size=64", "run.epochs=1", "run.progress=false"]
    weights = []
    for given, held_out in ((train, test), ((x, y), test.dataset.tensors), (TensorDataset(x, y), test.dataset)):
        torch.manual_seed(0)
        cfg = load_config(None, [*overrides, f"run.out={tmp_path}"])
        result = fit(cfg, model=user_models.unet(width=4), train_loader=given, test_loader=held_out, quiet=True)
        assert 0 <= result["test_acc"] <= 1
        weights.append(load_checkpoint(Path(result["run_dir"]) / "ckpt_last.pt")["model"])
    for other in weights[1:]:
        assert all(torch.equal(weights[0][key], other[key]) for key in weights[0])
    with pytest.raises(ValueError, match=r"\[8, 7\] samples"):
        fit(cfg, model=user_models.unet(width=4), train_loader=(x[:8], y[:7]), quiet=True)


def test_evaluate_takes_a_plain_dataloader_of_pairs(synthetic_root: Path) -> None:
    from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model

    _, test = loaders(synthetic_root)
    engine = LocalEngine(
        create_model("resnet8", num_classes=10, in_channels=1, width=4),
        MethodCfg(name="dgl"),
        ClassificationTask(10),
        OptimCfg(),
        split=2,
    )
    result = engine.evaluate(test)  # (x, y) batches, not (x, y, raw)
    assert 0 <= result["test_acc"] <= 1 and len(result["aux_acc"]) == 1
    with pytest.raises(ValueError, match=r"a batch must be \(input, target\) or \(input, target, raw_uint8\)"):
        engine.evaluate([torch.zeros(2, 1, 16, 16)])


def test_a_failed_capture_names_the_submodule_and_line_and_the_fix_works_in_python_and_the_cli(
    synthetic_root: Path, tmp_path: Path, capsys
) -> None:
    from locallearn import UnitBackbone
    from locallearn.models.capture import CaptureError
    from tests import user_models

    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(CaptureError) as info:
        UnitBackbone.from_module(user_models.gated(), x, cuts=["stem"])
    message = str(info.value)
    assert "at gate (user_models.py:" in message and "if x.mean() > 0:" in message, message
    assert "leaf_modules=['gate'] (CLI: model.leaf_modules=[gate])" in message and "\n" not in message
    backbone = UnitBackbone.from_module(user_models.gated(), x, cuts=["stem"], leaf_modules=["gate"])
    assert len(backbone) >= 2
    argv = ["train", "-c", "configs/smoke/fmnist_dgl_k3.yaml", *base(synthetic_root, tmp_path)]
    argv += ["model.name=tests.user_models:gated", "split.cuts=[stem]", "split.k=null", "run.max_steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()  # one line: not torch's partial graph dump of the failed export
    assert "model.leaf_modules=[gate]" in err and len(err.splitlines()) == 1, err
    assert main([*argv, "model.leaf_modules=[gate]"]) == 0
