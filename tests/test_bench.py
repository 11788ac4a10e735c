"""Meters (storage dedup, release per local backward, parameter/gradient/optimizer bytes, exact FLOPs, speed),
``locallearn bench`` end to end on tiny settings (one row per (method, K), resumable accuracy) and ``plot``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from locallearn import ClassificationTask, LocalEngine, MethodCfg, OptimCfg, create_model
from locallearn.bench import engine_flops, parse_method, parse_variants, variant_config
from locallearn.bench import runs as runs_mod
from locallearn.bench.report import load_results, save_results
from locallearn.cli.main import main
from locallearn.measure import SavedTensorMeter, model_state_bytes, peak_rss_bytes, tensor_bytes, train_flops
from locallearn.measure.speed import interleaved_throughput
from locallearn.train.config import SplitCfg, load_config, to_dict

from .conftest import tiny_overrides
from .test_engine import make_batch

DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "fmnist" / "demo.yaml")
PNG = b"\x89PNG\r\n\x1a\n"


# ---- meters ------------------------------------------------------------------------------------------------------


def test_meter_counts_a_storage_once_across_views_and_ops() -> None:
    """x·x saves x twice (one storage), pow saves a view of h (h's storage): only x and h count, B·8·4 B each.
    (A leaf that requires grad is a parameter, not an activation, so x is made by an op that saves nothing.)"""
    leaf = torch.randn(4, 8, requires_grad=True)
    meter = SavedTensorMeter()
    with meter:
        x = leaf + 1.0
        h = (x * x).relu()  # mul saves x twice; relu saves its output h
        h.view(2, 16).pow(2).sum().backward()  # pow saves its input, a view of h
    assert meter.peak == 4 * 8 * 4 + 4 * 8 * 4


def test_engine_releases_after_each_local_backward() -> None:
    """After a local step nothing is alive (current 0), and the peak is one module's worth, not the sum."""
    torch.manual_seed(0)
    engine = LocalEngine(
        create_model("resnet8", num_classes=4, in_channels=1, width=4),
        MethodCfg(name="dgl"),
        ClassificationTask(4),
        OptimCfg(),
        split=SplitCfg(k=2),
    )
    engine.meter = meter = SavedTensorMeter()
    with meter:
        engine.train_step(make_batch(n=8))
    assert meter.current == 0 and meter.peak > 0
    first = meter.peak
    meter.reset()
    with meter:
        engine.train_step(make_batch(n=8))
    assert meter.peak == first  # same shapes, same saved bytes every step


def test_parameter_gradient_and_optimizer_bytes() -> None:
    lin = nn.Linear(10, 5)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)

    def state() -> list[torch.Tensor]:
        return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]

    before = model_state_bytes(lin.parameters(), state())
    assert before == {"param_bytes": 55 * 4, "grad_bytes": 0, "optim_state_bytes": 0}
    lin(torch.randn(3, 10)).sum().backward()
    opt.step()
    assert model_state_bytes(lin.parameters(), state()) == {k: 55 * 4 for k in before}
    w = lin.weight
    assert tensor_bytes([w, w.t(), None]) == 50 * 4  # a view shares the storage
    assert peak_rss_bytes() > 10 * 2**20


def peak_of(name: str, k: int) -> int:
    torch.manual_seed(0)
    split = SplitCfg(k=k, preset="infopro" if k > 1 else "auto")
    engine = LocalEngine(
        create_model("resnet32", num_classes=4, in_channels=1, width=4),
        MethodCfg(name=name),
        ClassificationTask(4),
        OptimCfg(),
        split=split,
    )
    engine.meter = SavedTensorMeter()
    with engine.meter:
        engine.train_step(make_batch(n=4, size=12))
    return engine.meter.peak


@pytest.mark.parametrize("name", ["dgl", "infopro"])
def test_resnet32_local_peak_below_e2e_and_falls_with_k(name: str) -> None:
    e2e = peak_of("e2e", 1)
    local = [peak_of(name, k) for k in (2, 4, 8, 16)]
    assert all(p < e2e for p in local)
    assert all(a > b for a, b in zip(local, local[1:])), local


def test_flops_equal_the_analytic_count() -> None:
    """Conv forward = 2·N·Cout·H·W·Cin·k·k; backward = 2× forward (grad input + grad weight), except for a conv
    whose input needs no gradient (the first one), which computes only the weight gradient (1×)."""
    n, h, w = 2, 6, 5
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1, bias=False))
    f1, f2 = 2 * n * 8 * h * w * 3 * 9, 2 * n * 4 * h * w * 8 * 9
    x = torch.randn(n, 3, h, w)
    assert train_flops(lambda t: net(t).sum(), x) == (f1 + f2, f1 + 2 * f2)
    assert train_flops(lambda t: net(t).sum(), x.requires_grad_()) == (f1 + f2, 2 * (f1 + f2))


def test_engine_flops_split_backbone_and_aux() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4, in_channels=1, width=4)
    e2e = LocalEngine(model, MethodCfg(name="e2e"), ClassificationTask(4), OptimCfg(), split=SplitCfg(k=1))
    f = engine_flops(e2e, make_batch(n=4))
    assert f["aux_fwd"] == f["aux_bwd"] == 0 and f["aux_overhead"] == 0
    assert f["bwd"] > f["fwd"] > 0
    dgl = LocalEngine(model, MethodCfg(name="dgl"), ClassificationTask(4), OptimCfg(), split=SplitCfg(k=3))
    g = engine_flops(dgl, make_batch(n=4))
    assert g["fwd"] == f["fwd"] and g["bwd"] < f["bwd"]  # same forward; detached module inputs get no gradient
    assert g["aux_overhead"] > 0 and len(g["per_module"]) == 3


def test_interleaved_throughput_ratios_are_per_round() -> None:
    calls: list[str] = []
    steps = {"a": lambda i: calls.append("a"), "b": lambda i: calls.append("b")}
    out = interleaved_throughput(steps, images_per_step=4, block=2, warmup=1, repeats=3, reference="a")
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then rounds of interleaved blocks
    assert out["a"].ratios == [1.0, 1.0, 1.0] and len(out["b"].images_per_s) == 3


def test_parse_variants() -> None:
    v = parse_variants(["e2e", "infopro", "infopro:infopro_star"], [2, 4])
    assert [(x.label, x.k) for x in v] == [
        ("e2e", 1),
        ("infopro", 2),
        ("infopro", 4),
        ("infopro:infopro_star", 2),
        ("infopro:infopro_star", 4),
    ]
    with pytest.raises(ValueError, match="unknown method"):
        parse_variants(["e2f"], [2])


def test_method_syntax_names_add_on_presets_and_splits() -> None:
    """``name[+addon...][:split]``, the same in compare and bench; each add-on expands to its preset's options."""
    assert parse_method("infopro+hpff:infopro_star") == ("infopro", ("hpff",), "infopro_star")
    (v,) = parse_variants(["dgl+man"], [8])
    assert (v.label, v.key, v.addons) == ("dgl+man", "dgl+man|k8", ("man",))
    assert v.overrides() == [
        "method.name=dgl",
        "split.k=8",
        "method.addons=[]",  # the config's own add-ons never leak into a row: it runs what its label says
        'method.addons=["man"]',
        'method.bridge_combine="sum"',
    ]
    hpff_preset = load_config("configs/cifar10/resnet32_dgl_hpff_k8.yaml")
    assert variant_config(hpff_preset, parse_variants(["dgl"], [8])[0]).method.addons == []
    assert variant_config(hpff_preset, parse_variants(["e2e"], [8])[0]).method.addons == []
    cfg = variant_config(load_config(DEMO), parse_variants(["infopro+mlaan"], [4])[0])
    assert (cfg.method.name, cfg.method.addons, cfg.method.cascade_final) == ("infopro", ["cascade", "lam"], "both")
    for token, message in (("dgl+mann", "unknown add-on preset 'mann'"), ("e2e+man", "e2e has one module")):
        with pytest.raises(ValueError, match=message):
            parse_variants([token], [2])


# ---- bench and plot, end to end ---------------------------------------------------------------------------------


def fast(root: Path, out: Path) -> list[str]:
    return [*tiny_overrides(root, out), "run.epochs=1", "data.limit_train=128", "run.threads=1"]


@pytest.fixture(scope="module")
def bench_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    args = ["--methods", "e2e,dgl,infopro", "--k", "2,3", "--out", str(out), *fast(synthetic_root, out)]
    assert main(["bench", "memory", "-c", DEMO, *args]) == 0
    assert main(["bench", "speed", "-c", DEMO, "--steps", "1", "--repeats", "2", "--warmup", "1", *args]) == 0
    return out


def test_bench_memory_and_speed_write_one_row_per_variant(bench_dir: Path) -> None:
    results = json.loads((bench_dir / "results.json").read_text())
    rows = {(r["label"], r["k"]): r for r in results["rows"]}
    assert sorted(rows) == [("dgl", 2), ("dgl", 3), ("e2e", 1), ("infopro", 2), ("infopro", 3)]
    e2e = rows[("e2e", 1)]
    assert e2e["speed"]["ratio_to_e2e"] == 1.0 and e2e["flops"]["aux_overhead"] == 0
    assert rows[("dgl", 2)]["memory"]["peak_act_bytes"] < e2e["memory"]["peak_act_bytes"]
    assert all(r["memory"]["param_bytes"] > 0 and r["speed"]["images_per_s"] > 0 for r in rows.values())
    assert {"cpu", "threads", "torch", "git", "load_avg", "command"} <= set(results["machine"])
    md = (bench_dir / "results.md").read_text()
    assert "| e2e | 1 |" in md and md.count("| dgl | 2 |") == 3  # main, memory-detail and speed tables


def test_bench_speed_times_a_compiled_row_beside_its_eager_one(synthetic_root: Path, tmp_path: Path) -> None:
    """``dgl+compile`` is ``dgl`` under run.compile: same training, its own row, the first step (the compile) timed
    on its own and shown in the table."""
    args = ["--methods", "e2e,dgl,dgl+compile", "--k", "2", "--out", str(tmp_path), *fast(synthetic_root, tmp_path)]
    speed = ["--steps", "1", "--repeats", "1", "--warmup", "1"]
    assert main(["bench", "speed", "-c", DEMO, *speed, *args, "run.compile_backend=aot_eager"]) == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert sorted(rows) == ["dgl", "dgl+compile", "e2e"]
    assert all(r["speed"]["first_step_s"] > 0 for r in rows.values())
    assert "| dgl+compile | 2 |" in (tmp_path / "results.md").read_text()


def test_bench_rejects_a_different_config_in_the_same_out(bench_dir: Path, synthetic_root: Path, capsys) -> None:
    args = ["--methods", "e2e", "--out", str(bench_dir), *fast(synthetic_root, bench_dir), "model.width=4"]
    assert main(["bench", "memory", "-c", DEMO, *args]) == 2
    assert "different config" in capsys.readouterr().err
    other_seed = ["--methods", "e2e", "--out", str(bench_dir), *fast(synthetic_root, bench_dir), "run.seed=1"]
    assert main(["bench", "memory", "-c", DEMO, *other_seed]) == 0  # another first seed: the same study


def test_bench_accuracy_resumes(bench_dir: Path, synthetic_root: Path, monkeypatch) -> None:
    calls: list[object] = []
    real_fit = runs_mod.fit

    def counting_fit(cfg, resume=None, **kw):
        calls.append(resume)
        return real_fit(cfg, resume=resume, quiet=True, **kw)

    monkeypatch.setattr(runs_mod, "fit", counting_fit)
    args = ["-c", DEMO, "--methods", "e2e,dgl", "--k", "2", "--out", str(bench_dir), *fast(synthetic_root, bench_dir)]
    assert main(["bench", "accuracy", *args]) == 0
    assert calls == [None, None]
    assert main(["bench", "accuracy", *args]) == 0  # everything finished: nothing trains again
    assert len(calls) == 2
    # An interruption after the run's checkpoint but before its row was recorded: the run continues, no new dir.
    path = bench_dir / "results.json"
    results = json.loads(path.read_text())
    lost = results["runs"].pop()
    path.write_text(json.dumps(results))
    assert main(["bench", "accuracy", *args]) == 0
    assert len(calls) == 3 and calls[-1] == bench_dir / lost["run_dir"]
    results = json.loads(path.read_text())
    assert len(results["runs"]) == 2 and len(list((bench_dir / "runs").iterdir())) == 2
    md = (bench_dir / "results.md").read_text()
    assert "(n=1)" in md
    record = results["runs"][0]
    assert {"method", "addons", "k", "seed", "epochs", "train_size", "test_acc", "peak_activation_bytes"} <= set(record)
    assert record["train_size"] == 128 and record["addons"] == []
    assert "training time per run" in md
    # --report-only: records read again from the run folders (a stale field is rewritten), nothing trains
    expected = json.loads(json.dumps(results["runs"]))
    results["runs"][0]["train_s"] = -1.0
    path.write_text(json.dumps(results))
    assert main(["bench", "accuracy", *args, "--report-only"]) == 0
    assert len(calls) == 3 and json.loads(path.read_text())["runs"] == expected


def test_bench_accuracy_runs_add_ons_in_parallel_workers(synthetic_root: Path, tmp_path: Path) -> None:
    """``--methods dgl+man`` trains the add-on; ``--jobs 2`` runs two processes and records the same accuracy as
    one process would (bitwise: same seeds, one thread each); the gap-closed column appears."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["-c", DEMO, "--methods", "e2e,dgl,dgl+man", "--k", "2"]
    assert main(["bench", "accuracy", *common, "--out", str(two), "--jobs", "2", *fast(synthetic_root, two)]) == 0
    assert main(["bench", "accuracy", *common, "--out", str(one), *fast(synthetic_root, one)]) == 0
    got = [json.loads((d / "results.json").read_text())["runs"] for d in (one, two)]
    assert [r["label"] for r in got[1]] == ["e2e", "dgl", "dgl+man"]  # variant order, whatever finished first
    assert [r["test_acc"] for r in got[0]] == [r["test_acc"] for r in got[1]]
    assert got[1][2]["addons"] == ["man"] and len(list((two / "runs").glob("*.log"))) == 3
    md = (two / "results.md").read_text()
    assert "base→E2E gap closed" in md and md.count(" % |") >= 1


def test_parallel_studies_start_the_costliest_run_first(tmp_path: Path) -> None:
    """With several workers the run predicted to cost most (training FLOPs per step on the meta device) starts
    first; equal costs keep the given order (the seeds of one variant)."""
    base = load_config(DEMO, ["model.width=8"])
    variants = parse_variants(["e2e", "dgl", "dgl+mlaan", "infopro"], [4])
    runs = runs_mod.plan_runs(base, variants, [0, 1], tmp_path)
    order = [(r.variant.label, r.seed) for r in runs_mod.longest_first(runs)]
    assert order[:2] == [("dgl+mlaan", 0), ("dgl+mlaan", 1)]
    assert order[2:4] == [("infopro", 0), ("infopro", 1)]
    assert {label for label, _ in order[4:]} == {"e2e", "dgl"}


def test_two_bench_commands_on_one_folder_keep_each_others_results(tmp_path: Path) -> None:
    """A speed bench written into a study that is still training (each read the file before the other wrote):
    the study's next save keeps the speed, the speed bench's save keeps the study's runs."""
    config = to_dict(load_config(DEMO))
    study = load_results(tmp_path, config)
    study["rows"] = [
        {"key": "e2e|k1", "label": "e2e", "method": "e2e", "k": 1},
        {"key": "dgl|k2", "label": "dgl", "method": "dgl", "k": 2},
    ]
    study["runs"] = [{"key": "dgl|k2", "seed": 0, "test_acc": 0.8}]
    save_results(tmp_path, study)
    speed = load_results(tmp_path, config)
    study["runs"].append({"key": "e2e|k1", "seed": 0, "test_acc": 0.9})
    save_results(tmp_path, study)  # finished a run meanwhile
    speed["rows"][1]["timing"] = {"images_per_s": 100.0}  # a field only the speed bench measured
    speed["commands"].append({"command": "bench speed", "date": "2026-12-05 01:00:00 UTC"})
    save_results(tmp_path, speed)
    study["runs"].append({"key": "dgl|k2", "seed": 1, "test_acc": 0.82})
    save_results(tmp_path, study)
    disk = json.loads((tmp_path / "results.json").read_text())
    assert [(r["key"], r["seed"]) for r in disk["runs"]] == [("e2e|k1", 0), ("dgl|k2", 0), ("dgl|k2", 1)]
    assert disk["rows"][1]["timing"]["images_per_s"] == 100.0 and disk["commands"][0]["command"] == "bench speed"
    # Values both hold: a process's save keeps what it did not change since it last read or wrote the file.
    memory = load_results(tmp_path, config)
    memory["rows"][1]["timing"] = {"images_per_s": 120.0}  # re-measured
    memory["runs"][1]["train_s"] = 60.0  # dgl seed 0's record read again from its run folder
    save_results(tmp_path, memory)
    study["runs"].append({"key": "e2e|k1", "seed": 1, "test_acc": 0.91})
    save_results(tmp_path, study)  # holds the old timing and dgl seed 0 (unchanged by the study): both kept
    speed["commands"].append({"command": "bench speed", "date": "2026-12-05 02:00:00 UTC"})
    save_results(tmp_path, speed)

    def dgl0(results: dict) -> dict:
        return next(r for r in results["runs"] if (r["key"], r["seed"]) == ("dgl|k2", 0))

    disk = json.loads((tmp_path / "results.json").read_text())
    assert disk["rows"][1]["timing"]["images_per_s"] == 120.0 and dgl0(disk)["train_s"] == 60.0
    assert len(disk["runs"]) == 4 and dgl0(study)["train_s"] == 60.0  # a save brings the others' changes in
    dgl0(study)["test_acc"] = 0.79  # changed by this process: it wins
    save_results(tmp_path, study)
    assert dgl0(json.loads((tmp_path / "results.json").read_text())) == {**dgl0(disk), "test_acc": 0.79}


def test_a_time_balanced_study_trains_every_method(synthetic_root: Path, tmp_path: Path) -> None:
    """``split.balance=time`` is measured when each run starts; checking the variants before training must not
    skip the local methods for it."""
    args = ["-c", DEMO, "--methods", "e2e,dgl", "--k", "2", "--out", str(tmp_path), *fast(synthetic_root, tmp_path)]
    assert main(["bench", "accuracy", *args, "split.balance=time"]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["e2e", "dgl"]


def test_plot_writes_pngs(bench_dir: Path, tmp_path: Path) -> None:
    if not (bench_dir / "runs").exists():
        pytest.skip("needs the accuracy runs of test_bench_accuracy_resumes")
    assert main(["plot", str(bench_dir), "--out", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    expected = {"accuracy_vs_epoch", "aux_accuracy_by_depth", "accuracy_vs_memory", "accuracy_vs_time"}
    expected |= {"throughput", "memory_vs_k"}
    assert names == {f"{n}.png" for n in expected}
    for p in tmp_path.glob("*.png"):
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 1000


def test_plots_name_runs_as_their_study_does_and_keep_labels_apart(tmp_path: Path) -> None:
    """A bench run is named by its variant (``dgl+mlaan K=8``, not the add-on's expanded parts) with its seed
    apart, so seeds share a colour; two points at the same place get labels that do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from locallearn.bench.plot import _run_label, place_labels

    cfg = to_dict(load_config(DEMO, ["method.name=dgl", "method.addons=[cascade,lam]", "run.seed=1"]))
    for name, expected in (("dgl+mlaan_k8_seed1", "dgl+mlaan K=8"), (None, "dgl+cascade+lam K=2"), ("mine", "mine")):
        cfg["run"]["name"] = name
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert _run_label(tmp_path, [{"train_loss": [1.0, 1.0]}]) == (expected, 1)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    place_labels(ax, [(0.5, 0.5, "infopro+man K=8"), (0.5, 0.5, "infopro+hpff K=8"), (0.5, 0.5, "dgl K=8")])
    offsets = [text.xyann for text in ax.texts]
    assert len(set(offsets)) == 3, offsets
    plt.close(fig)


def test_accuracy_vs_memory_uses_the_total_step_peak_when_every_row_has_one() -> None:
    """The saved-tensor meter does not see recomputation, so the frontier plots the allocator-level total when the
    memory bench measured it for every point, and the meter's figure otherwise (never a mix)."""
    from locallearn.bench.plot import memory_axis
    from locallearn.bench.report import table_rows

    both = [{"peak_act_mib": 30.0, "total_peak_mib": 110.0}, {"peak_act_mib": 58.0, "total_peak_mib": 85.0}]
    assert memory_axis(both)[0] == "total_peak_mib" and "total step peak" in memory_axis(both)[1]
    mixed = [both[0], {"peak_act_mib": 58.0, "total_peak_mib": None}]
    assert memory_axis(mixed)[0] == "peak_act_mib" and "saved-tensor meter" in memory_axis(mixed)[1]
    # a memory bench that could not measure the allocator peak records None: the row has no total, no error
    row = {"key": "dgl|k2", "label": "dgl", "method": "dgl", "k": 2, "addons": []}
    row["memory"] = {"peak_act_bytes": 2**20, "total_step_peak_bytes": None}
    assert table_rows({"rows": [row], "runs": []})[0]["total_peak_mib"] is None


def test_gap_closed_compares_the_seeds_all_three_rows_have() -> None:
    """An add-on trained at seed 0 only is compared with its base's and E2E's seed 0, not with their means."""
    from locallearn.bench.report import gap_closed

    rows = [
        {"key": "e2e|k1", "method": "e2e", "addons": []},
        {"key": "dgl|k8", "method": "dgl", "split": None, "k": 8, "addons": []},
        {"key": "dgl+man|k8", "method": "dgl", "split": None, "k": 8, "addons": ["man"]},
    ]
    accs = {("e2e|k1", 0): 0.92, ("e2e|k1", 1): 0.93, ("dgl|k8", 0): 0.90, ("dgl|k8", 1): 0.91}
    accs[("dgl+man|k8", 0)] = 0.91
    results = {"rows": rows, "runs": [{"key": k, "seed": s, "test_acc": a} for (k, s), a in accs.items()]}
    assert gap_closed(results, rows[2]) == pytest.approx(0.5)  # (0.91 - 0.90) / (0.92 - 0.90), seed 0
    results["runs"].append({"key": "dgl+man|k8", "seed": 1, "test_acc": 0.93})
    assert gap_closed(results, rows[2]) == pytest.approx((0.92 - 0.905) / (0.925 - 0.905))  # both seeds
    assert gap_closed(results, rows[1]) is None  # a base closes no gap


def test_plot_errors_are_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["plot", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "pip install 'locallearn[plot]'" in capsys.readouterr().err


def test_bench_pareto_joins_study_accuracy_memory_time_and_flops(synthetic_root: Path, tmp_path: Path) -> None:
    """``bench pareto``: memory and speed are measured, accuracy comes from a study (a +ckpt row takes its base's),
    and pareto.md/png are written."""
    study, out = tmp_path / "study", tmp_path / "pareto"
    args = ["-c", DEMO, "--k", "2", *fast(synthetic_root, study)]
    assert main(["bench", "accuracy", "--methods", "e2e,dgl", "--out", str(study), *args]) == 0
    timing = ["--steps", "1", "--repeats", "1", "--warmup", "1"]
    argv = ["bench", "pareto", "--methods", "e2e,e2e+ckpt,dgl", "--out", str(out), *timing, *args]
    assert main([*argv, "--accuracy", str(study / "results.json")]) == 0
    table = (out / "pareto.md").read_text()
    accs = {r["label"]: r["test_acc"] for r in json.loads((study / "results.json").read_text())["runs"]}
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert f"{100 * accs['e2e']:.2f}" in lines["e2e+ckpt"] and f"{100 * accs['dgl']:.2f}" in lines["dgl"]
    assert (out / "pareto.png").read_bytes().startswith(PNG)
    assert main([*argv, "--accuracy", str(tmp_path / "nope.json")]) == 2
    # --report-only: the study grew; the table is rewritten from the measured record, which stays untouched
    (out / "pareto.md").unlink()
    record = (out / "results.json").read_text()
    assert main([*argv, "--accuracy", str(study / "results.json"), "--report-only"]) == 0
    assert (out / "pareto.md").read_text() == table and (out / "results.json").read_text() == record
    assert main(["bench", "pareto", "--report-only", *args, "--out", str(tmp_path / "empty")]) == 2


def test_pareto_frontier_keeps_rows_no_other_row_beats_on_every_axis() -> None:
    from locallearn.bench.pareto import pareto_rows

    def row(label: str, peak: int, ms: float) -> dict:
        return {
            "label": label,
            "method": label,
            "k": 1,
            "memory": {"total_step_peak_bytes": peak},
            "speed": {"step_ms": ms},
        }

    results = {"rows": [row("e2e", 100, 10.0), row("a", 50, 12.0), row("b", 60, 13.0), row("c", 40, 20.0)]}
    study = {
        "runs": [{"key": f"{n}|k1", "test_acc": acc} for n, acc in (("e2e", 0.9), ("a", 0.8), ("b", 0.8), ("c", 0.7))]
    }
    frontier = {r["label"]: r["frontier"] for r in pareto_rows(results, study)}
    assert frontier == {"e2e": True, "a": True, "b": False, "c": True}  # b: a has less memory, time, same accuracy


def test_a_study_written_by_an_earlier_version_continues(tmp_path: Path) -> None:
    """A results.json whose config predates renamed or added keys (run.amp, log, method.aux_recompute) is the same
    config: a study spanning versions continues instead of being refused."""
    from locallearn.bench.report import load_results
    from locallearn.train.config import load_config, to_dict

    config = to_dict(load_config(DEMO))
    old = json.loads(json.dumps(config))
    old["run"].pop("precision")
    old["run"]["amp"] = "none"
    old.pop("log")
    old["method"].pop("aux_recompute")
    (tmp_path / "results.json").write_text(
        json.dumps({"format": 1, "config": old, "rows": [], "runs": [], "commands": []})
    )
    assert load_results(tmp_path, config)["config"] == config
    changed = to_dict(load_config(DEMO, ["optim.lr=0.2"]))
    with pytest.raises(ValueError, match="optim.lr"):
        load_results(tmp_path, changed)


def test_plot_reads_compare_folders_skips_empty_runs_and_keeps_labels_and_colours(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """The committed demo (a ``compare`` folder) gives accuracy vs memory and vs time; a run folder without
    metrics is skipped with a note; two runs with one label get their folder names; a method keeps its colour in
    every figure; memory and time axes start at 0, epoch axes have whole-number ticks."""
    import shutil

    from locallearn.bench import plot as plot_module

    demo = tmp_path / "demo"
    shutil.copytree("benchmarks/demo_fmnist", demo, ignore=shutil.ignore_patterns("*_2026-*"))
    e2e = next((demo / "runs").glob("*_e2e_k1_seed0"))
    shutil.copytree(e2e, demo / "runs" / f"{e2e.name}_1")  # the same run twice
    (tmp_path / "failed_run").mkdir()
    seen: dict[str, tuple[list[str], list[str], tuple[float, float], list[float]]] = {}
    original = plot_module.legend

    def legend(ax) -> None:
        handles, labels = ax.get_legend_handles_labels()
        colours = [getattr(h, "get_color", lambda: None)() for h in handles]
        seen[ax.get_title()] = (labels, colours, ax.get_xlim(), list(ax.get_xticks()))
        original(ax)

    monkeypatch.setattr(plot_module, "legend", legend)
    written = {p.name for p in plot_module.plot([demo, tmp_path / "failed_run"], tmp_path / "figs")}
    assert {"accuracy_vs_memory.png", "accuracy_vs_time.png", "accuracy_vs_epoch.png"} <= written
    assert "plot: skipping" in capsys.readouterr().err
    labels, colours, _, ticks = seen["Test accuracy of the final head"]
    assert len(labels) == len(set(labels)) == 5 and sum(label.startswith("e2e K=1 seed 0 (") for label in labels) == 2
    assert all(t == int(t) for t in ticks)
    by_method = dict(zip((label.split(" K=")[0] for label in labels), colours))
    assert len(set(by_method.values())) == 4
    for title in ("Test accuracy vs training memory", "Test accuracy vs training time"):
        assert seen[title][2][0] == 0  # the axis starts at 0
    assert plot_module.method_colours(["e2e K=1", "dgl K=4", "dgl K=8"]) == {"e2e": "C0", "dgl": "C1"}
