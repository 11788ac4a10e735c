"""Whole runs through ``fit`` and the CLI, on a learnable synthetic dataset written as real IDX files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from locallearn.cli.main import main
from locallearn.train import fit, load_checkpoint, load_config

from .conftest import tiny_overrides

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("method,k", [("dgl", 3), ("infopro", 3)])
def test_tiny_run_learns(synthetic_root: Path, tmp_path: Path, method: str, k: int) -> None:
    extra = ["method.loss_mode=softmax"] if method == "infopro" else []
    cfg = load_config(
        None,
        tiny_overrides(synthetic_root, tmp_path) + [f"method.name={method}", f"split.k={k}", "run.epochs=4", *extra],
    )
    result = fit(cfg, quiet=True)
    records = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"][-1] < records[0]["train_loss"][-1]
    assert result["test_acc"] > 0.6, f"{method} K={k} did not learn: test accuracy {result['test_acc']:.3f}"
    assert len(result["aux_acc"]) == k - 1
    assert result["peak_act_bytes"] > 0


def test_resume_mid_epoch_is_bitwise_exact(synthetic_root: Path, tmp_path: Path) -> None:
    """2 epochs straight == 3 steps, stop, resume from the checkpoint (weights_only load), finish."""
    base = tiny_overrides(synthetic_root, tmp_path) + ["method.name=infopro", "split.k=3"]
    full = fit(load_config(None, base), quiet=True)
    part = fit(load_config(None, base + ["run.max_steps=3"]), quiet=True)
    assert load_checkpoint(Path(part["run_dir"]) / "ckpt_last.pt")["step"] == 3
    resumed = fit(resume=part["run_dir"], overrides=["run.max_steps=null"], quiet=True)
    a = load_checkpoint(Path(full["run_dir"]) / "ckpt_last.pt")
    b = load_checkpoint(Path(resumed["run_dir"]) / "ckpt_last.pt")
    assert a["step"] == b["step"] == 16
    for part_name in ("model", "aux"):
        for key, value in a[part_name].items():
            assert torch.equal(value, b[part_name][key]), f"{part_name}.{key} differs after resume"
    assert a["optim"][0]["state"][0]["momentum_buffer"].equal(b["optim"][0]["state"][0]["momentum_buffer"])
    assert full["test_acc"] == resumed["test_acc"]


def test_a_run_killed_mid_epoch_records_the_whole_epoch_after_resume(
    synthetic_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """Killed at step 5 (last checkpoint at step 3), resumed: every epoch record (loss, train accuracy, test
    accuracy) equals the uninterrupted run's, and its time covers all of the epoch's samples, not only the part
    trained after the resume."""
    from locallearn.train.engine import LocalEngine
    from locallearn.train.rundir import training_seconds

    base = tiny_overrides(synthetic_root, tmp_path) + ["method.name=dgl", "split.k=3", "run.ckpt_every=3"]
    full = fit(load_config(None, base), quiet=True)
    real_step, calls = LocalEngine.train_step, []

    def killed_at_step_6(self, batch):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(LocalEngine, "train_step", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        fit(load_config(None, base), quiet=True)
    monkeypatch.setattr(LocalEngine, "train_step", real_step)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != Path(full["run_dir"]).name]
    resumed = fit(resume=run_dir, quiet=True)

    def records(run: str | Path) -> list[dict]:
        return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]

    a, b = records(full["run_dir"]), records(resumed["run_dir"])
    assert [r["step"] for r in a] == [r["step"] for r in b] == [8, 16]
    for x, y in zip(a, b):
        assert (x["train_loss"], x["train_acc"], x["test_acc"]) == (y["train_loss"], y["train_acc"], y["test_acc"])
        assert y["imgs_per_s"] * y["epoch_time_s"] == pytest.approx(y["train_size"], rel=1e-9)
    assert training_seconds(b, 64) == pytest.approx(sum(r["epoch_time_s"] for r in b), rel=1e-9)


def test_training_seconds_counts_every_step_at_its_measured_speed() -> None:
    """1000 images, batch 128: 8 steps per epoch, the last one 104 images. A whole epoch at 100 images/s, a
    partial record (3 steps, max_steps), then the rest of epoch 2 as a record from before checkpoints carried the
    unrecorded time (it timed only its resumed part: 2 s for 256 images): each counts its own samples."""
    from locallearn.train.rundir import training_seconds

    records = [
        {"step": 8, "train_size": 1000, "imgs_per_s": 100.0, "epoch_time_s": 10.0},
        {"step": 11, "train_size": 1000, "imgs_per_s": 128.0, "epoch_time_s": 3.0},
        {"step": 16, "train_size": 1000, "imgs_per_s": 128.0, "epoch_time_s": 2.0},
    ]
    assert training_seconds(records, 128) == pytest.approx(10.0 + 3.0 + (4 * 128 + 104) / 128)
    assert training_seconds([{"step": 8, "epoch_time_s": 7.0}], 128) == 7.0  # no train_size: its own time


def test_resume_rejects_a_changed_method(synthetic_root: Path, tmp_path: Path) -> None:
    run = fit(load_config(None, tiny_overrides(synthetic_root, tmp_path) + ["run.max_steps=1"]), quiet=True)
    with pytest.raises(ValueError, match="split.k differ"):
        fit(resume=run["run_dir"], overrides=["split.k=2"], quiet=True)


def test_cli_train_eval_summary_compare(synthetic_root: Path, tmp_path: Path, capsys) -> None:
    args = tiny_overrides(synthetic_root, tmp_path) + ["run.max_steps=2", "method.name=dgl", "split.k=2"]
    assert main(["train", "-c", "configs/smoke/fmnist_dgl_k3.yaml", *args]) == 0
    run_dir = next(tmp_path.glob("*_resnet8_dgl_k2"))
    for name in ("config.yaml", "env.json", "metrics.jsonl", "ckpt_last.pt"):
        assert (run_dir / name).is_file(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["split"]["k"] == 2 and saved["data"]["limit_train"] is None  # the overrides win over the preset
    assert main(["eval", str(run_dir)]) == 0
    assert "test_acc" in capsys.readouterr().out
    assert (
        main(["summary", "-c", "configs/fmnist/demo.yaml", "model.name=resnet14", "split.k=4", "data.batch_size=8"])
        == 0
    )
    out = capsys.readouterr().out
    assert "| total | 8 |" in out and "aux overhead" in out
    assert main(["compare", "-c", "configs/smoke/fmnist_dgl_k3.yaml", "--methods", "e2e,dgl", *args]) == 0
    table = capsys.readouterr().out
    assert "| e2e | 1 |" in table and "| dgl | 2 |" in table
    assert main(["list"]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "-c", "configs/fmnist/demo.yaml", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
        (["train", "-c", "configs/fmnist/demo.yaml", "split.k=99"], "more modules than the model has units"),
        (["train", "-c", "configs/fmnist/demo.yaml", "split.preset=infopro"], "only for ResNet"),
        (["train", "-c", "configs/fmnist/demo.yaml", "method.name=infopr"], "did you mean 'infopro'"),
        (["train", "-c", "configs/fmnist/demo.yaml", "data.root=/nonexistent"], "dataset-fashion-mnist"),
        (["train", "-c", "missing.yaml"], "not found"),
        (["train"], "needs -c"),
        (["eval", "/nonexistent/run"], "not found"),
        (["compare", "-c", "configs/fmnist/demo.yaml", "--methods", "e2e,foo"], "unknown method 'foo'"),
        (["compare", "-c", "configs/fmnist/demo.yaml", "--methods", "dgl+mann"], "unknown add-on preset 'mann'"),
        (["bench", "memory", "-c", "configs/fmnist/demo.yaml", "--methods", "e2e+man"], "e2e has one module"),
        (["compare", "-c", "configs/fmnist/demo.yaml", "--jobs", "0"], "--jobs must be >= 1"),
        (
            ["train", "-c", "configs/fmnist/demo.yaml", "run.epochs=-1"],
            "run.epochs=-1 is out of range: it must be >= 1",
        ),
        (["train", "-c", "configs/fmnist/demo.yaml", "run.epochs=0"], "run.epochs=0 is out of range"),
        (["train", "-c", "configs/fmnist/demo.yaml", "run.max_steps=-1"], "run.max_steps=-1 is out of range"),
        (["train", "-c", "configs/fmnist/demo.yaml", "data.limit_train=0"], "data.limit_train=0 is out of range"),
        (["train", "-c", "configs/fmnist/demo.yaml", "data.limit_test=0"], "data.limit_test=0 is out of range"),
        (["train", "-c", "configs/fmnist/demo.yaml", "data.batch_size=0"], "data.batch_size=0 is out of range"),
        (["train", "-c", "configs/fmnist/demo.yaml", "data.batch_size=-8"], "data.batch_size=-8 is out of range"),
        (["bench", "memory", "-c", "configs/fmnist/demo.yaml", "data.eval_batch_size=0"], "eval_batch_size=0"),
        (
            ["compare", "-c", "configs/fmnist/demo.yaml", "optim.lr=-0.1"],
            "optim.lr=-0.1 is out of range: it must be > 0",
        ),
        (["train", "-c", "configs/fmnist/demo.yaml", "method.ema_decay=1.5"], "must be in [0, 1)"),
        (["train", "-c", "configs/fmnist/demo.yaml", "optim.betas=[0.9,1.2]"], "optim.betas=[0.9, 1.2]"),
        (["train", "-c", "configs/fmnist/demo.yaml", "ppll.replicas=0"], "ppll.replicas=0 is out of range"),
    ],
)
def test_bad_input_is_one_line_error(argv: list[str], message: str, capsys, tmp_path: Path) -> None:
    assert main([*argv, f"run.out={tmp_path}"] if argv[0] != "eval" and len(argv) > 1 else argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("locallearn: error:") and "\n" not in err and message in err, err


@pytest.mark.parametrize("command", ["train", "compare", "bench"])
def test_an_unusable_output_folder_is_one_line_before_any_work(command: str, tmp_path: Path, capsys) -> None:
    """``run.out`` (or ``--out``) naming an existing file, or a folder that cannot be created, is refused before any
    data is read (``data.root`` points nowhere, so reading it would fail with another message)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    head = {"train": ["train"], "compare": ["compare"], "bench": ["bench", "memory"]}[command]
    nowhere = [f"data.root={tmp_path / 'no_data'}"]
    for out, message in ((afile, "is an existing file, not a folder"), (afile / "sub", "cannot create the folder")):
        flag = [f"run.out={out}"] if command == "train" else ["--out", str(out)]
        assert main([*head, "-c", "configs/fmnist/demo.yaml", *flag, *nowhere]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("locallearn: error:") and "\n" not in err and message in err, err
    assert main(["train", "-c", "configs/fmnist/demo.yaml", "run.out=/sys/locallearn_no", *nowhere]) == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_compare_skips_finished_methods_and_continues_an_interrupted_one(
    synthetic_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """``compare --out DIR`` run again: finished rows are kept, an interrupted run resumes from its checkpoint,
    and the table equals the uninterrupted comparison's (accuracy and memory)."""
    from locallearn.bench import runs as runs_mod

    args = [*tiny_overrides(synthetic_root, tmp_path), "data.limit_train=256", "run.epochs=2", "split.k=2"]
    full, split = tmp_path / "full", tmp_path / "split"
    cmd = ["compare", "-c", "configs/smoke/fmnist_dgl_k3.yaml", "--methods", "e2e,dgl+man"]
    assert main([*cmd, "--out", str(full), *args]) == 0
    real_fit, calls = runs_mod.fit, []

    def interrupted_fit(cfg, resume=None, **kw):  # the second method is killed 3 steps into epoch 1
        calls.append(resume)
        if cfg.method.addons and resume is None:
            real_fit(replace(cfg, run=replace(cfg.run, max_steps=3)), quiet=True)
            raise KeyboardInterrupt
        return real_fit(cfg, resume=resume, quiet=True, **kw)

    monkeypatch.setattr(runs_mod, "fit", interrupted_fit)
    assert main([*cmd, "--out", str(split), *args]) == 130
    assert main([*cmd, "--out", str(split), *args]) == 0
    assert calls[0] is None and calls[1] is None and calls[2] == next((split / "runs").glob("*dgl+man*"))
    rows = [json.loads((d / "compare.json").read_text())["rows"] for d in (full, split)]
    for a, b in zip(*rows, strict=True):
        assert (a["method"], a["test_acc"], a["peak_act_mib"]) == (b["method"], b["test_acc"], b["peak_act_mib"])
    assert main([*cmd, "--out", str(split), *args]) == 0 and len(calls) == 3  # all done: nothing trains
    path = split / "compare.json"  # a stale field of a finished row is read again from its run folder
    record = json.loads(path.read_text())
    fresh, record["rows"][0]["train_s"] = record["rows"][0]["train_s"], -1.0
    path.write_text(json.dumps(record))
    assert main([*cmd, "--out", str(split), *args]) == 0 and len(calls) == 3
    assert json.loads(path.read_text())["rows"][0]["train_s"] == fresh > 0


def test_untrusted_checkpoint_is_refused(tmp_path: Path) -> None:
    """A pickle that would run code on load is rejected by the weights_only loader."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"version": 1, "x": Evil()}, path, pickle_module=pickle)
    with pytest.raises(ValueError, match="not a locallearn checkpoint"):
        load_checkpoint(path)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_smoke(tmp_path: Path) -> None:
    cfg = load_config(
        "configs/smoke/fmnist_dgl_k3.yaml", ["run.max_steps=4", f"run.out={tmp_path}", "run.progress=false"]
    )
    result = fit(cfg, quiet=True)
    assert 0.0 <= result["test_acc"] <= 1.0 and len(result["aux_acc"]) == 2


def test_readme_python_example_runs() -> None:
    """The README's "your own model" example is complete: it runs as written."""
    import subprocess
    import sys

    text = Path("README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test_acc" in done.stdout


def test_resume_keeps_the_measured_peak(synthetic_root: Path, tmp_path: Path) -> None:
    base = tiny_overrides(synthetic_root, tmp_path) + ["method.name=dgl", "split.k=3"]
    part = fit(load_config(None, base + ["run.max_steps=3"]), quiet=True)
    resumed = fit(resume=part["run_dir"], overrides=["run.max_steps=null"], quiet=True)
    assert resumed["peak_act_bytes"] == part["peak_act_bytes"] > 0
