"""The bodies of ``locallearn eval|compare|summary|list|bench pipeline`` (``train`` is
:func:`locallearn.train.entry.fit`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..bench.report import METRIC_LABELS, format_metric
from ..bench.runs import plan_runs, run_record, train_runs
from ..bench.variants import Variant, parse_method
from ..data.datasets import dataset_spec, list_datasets
from ..local.split import list_presets
from ..methods.base import list_methods
from ..methods.options import ADDON_PRESETS, ADDONS
from ..models.registry import list_models
from ..parallel.ppll import load_stages, read_stage_checkpoints, stage_file
from ..tasks.task import Batch
from ..train.build import build_engine, build_loaders, build_task, resolve_device, resolve_time_balance
from ..train.checkpoint import load_checkpoint, save_tensors
from ..train.config import ConfigError, apply_overrides, changed_keys, config_from_dict, load_config, to_dict
from ..train.estimate import ModuleEstimate, estimate_step, meta_batch
from ..train.rundir import environment, make_dir, new_run_dir
from ..train.split import resolve_k

MiB = 2**20
EVAL_OVERRIDABLE = ("data.", "run.device", "run.threads")


def rebuild_run(run: str, overrides: list[str] = (), name: str = "last") -> tuple[Any, dict[str, Any], Any, Any]:
    """A trained run's engine, rebuilt from its checkpoint ``name`` (``last``, ``best``; a PPLL run's per-stage
    checkpoints assembled into one process): (engine, a checkpoint's state, its config, the test loader)."""
    path = Path(run)
    stages = None
    if path.is_dir() and not (path / f"ckpt_{name}.pt").exists() and any(path.glob(stage_file(0, name))):
        stages = read_stage_checkpoints(run, name)
    file = path / f"ckpt_{name}.pt" if path.is_dir() else path
    state = stages[0] if stages else load_checkpoint(file)
    bad = [o for o in overrides if not o.startswith(EVAL_OVERRIDABLE)]
    if bad:
        raise ConfigError(f"eval accepts only data.*, run.device and run.threads overrides, not {bad[0]!r}")
    trained = config_from_dict(state["config"]).data.scale  # before the overrides (they edit the dict in place)
    cfg = config_from_dict(apply_overrides(state["config"], list(overrides)))
    if cfg.data.scale != trained and build_task(cfg, dataset_spec(cfg.data.name)).kind == "super_resolution":
        raise ConfigError(
            f"data.scale={cfg.data.scale}, but {run} was trained at ×{trained} (its model upsamples ×{trained}); "
            f"evaluate with data.scale={trained}"
        )
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    _, test_loader, spec = build_loaders(cfg, device)
    engine = build_engine(cfg, spec, device, next(iter(test_loader))[0][: cfg.data.batch_size])
    if stages:
        load_stages(engine, stages)
    else:
        engine.load_state_dict(state)
    return engine, state, cfg, test_loader


def evaluate_run(run: str, overrides: list[str], name: str = "last") -> dict[str, Any]:
    """Rebuild a run from its checkpoint and evaluate the final head and every aux head."""
    engine, state, _, test_loader = rebuild_run(run, overrides, name)
    result = engine.evaluate(test_loader.batches())
    headline = engine.task.headline  # acc, psnr
    aux = " ".join("-" if a is None else f"{a:.4f}" for a in result[f"aux_{headline}"])
    tests = "  ".join(f"{key} {value:.4f}" for key, value in result.items() if key.startswith("test_"))
    print(
        f"{run} (epoch {state['epoch']}, step {state['step']}): {tests}"
        + (f"  aux_{headline} by depth [{aux}]" if aux else "")
    )
    return result


def export_run(run: str, out: str, name: str = "last", overrides: list[str] = ()) -> Path:
    """``locallearn export RUN_DIR --out model.pt``: the trained network as one plain ``state_dict`` with the
    model's own keys (a captured ``nn.Module``: the keys of your class, so ``model.load_state_dict(torch.load(path,
    weights_only=True))`` restores it; a PPLL run's stages assembled first). No aux nets, no optimizer."""
    engine, state, cfg, _ = rebuild_run(run, overrides, name)
    weights = {key: value.detach().cpu() for key, value in engine.backbone.state_dict().items()}
    target = Path(out)
    save_tensors(weights, target)
    print(
        f"wrote {target}: {len(weights)} tensors of {cfg.model.name} from {run} ({name} checkpoint: epoch "
        f"{state['epoch']}, step {state['step']}); load with model.load_state_dict(torch.load(path, weights_only=True))"
    )
    return target


def compare(
    config: str, methods: list[str], overrides: list[str], out: str | None = None, workers: int = 1
) -> list[dict[str, Any]]:
    """Train each method on the same data, seeds and backbone init; print and save one table.

    ``e2e`` always runs with K=1; the others use the preset's ``split.k``. A method may name add-on presets
    (``dgl+man``, ``infopro+hpff``, ``dgl+mlaan``). Memory is the saved-tensor meter's
    peak (activations autograd keeps for backward), so it is exact and comparable on any device.

    ``out``: rerunning with the same folder skips the methods already in its ``compare.json`` and continues an
    interrupted one from its checkpoint (:mod:`locallearn.bench.runs`); ``workers`` methods train at once.

    The test column is the task's headline (accuracy, PSNR, mAP). ``compare.json`` names it in ``metric`` and each
    row keeps the final ``test_*`` metrics under their logged keys (``test_acc``; ``test_psnr``, ``test_ssim``;
    ``test_map``, ``test_map50``).
    """
    if not methods:
        raise ConfigError("--methods is empty; e.g. --methods e2e,dgl,infopro,dgl+man,infopro+hpff")
    if workers < 1:
        raise ConfigError(f"--jobs must be >= 1, got {workers}")
    base = load_config(config, overrides)
    k = resolve_k(base.split, base.method.name)
    variants = []
    for token in methods:
        name, addons, split = parse_method(token)
        variants.append(Variant(name, split, 1 if name == "e2e" else k, addons))
    metric = build_task(base, dataset_spec(base.data.name)).headline  # every variant trains on the same data
    out_dir = make_dir(out, "--out") if out else new_run_dir(base.run.out, "compare")
    path = out_dir / "compare.json"
    record = json.loads(path.read_text()) if path.exists() else {"config": to_dict(base), "rows": []}
    record["config"] = to_dict(config_from_dict(record["config"]))  # an earlier version's keys, migrated
    if record["config"] != to_dict(base):
        diff = ", ".join(sorted(changed_keys(record["config"], to_dict(base)))[:4])
        raise ConfigError(f"{out_dir} holds a comparison of another config ({diff} differ); use another --out")
    record |= {"metric": metric, "env": environment(resolve_device(base.run.device))}  # the commit and load now
    done = {row["method"] for row in record["rows"]}
    for row in record["rows"]:
        print(f"{row['method']}: done, skipped", flush=True)
    order = [v.label for v in variants]

    def finished(run: dict[str, Any]) -> None:
        record["rows"].append(
            {
                "method": run["label"],
                "k": run["k"],
                f"test_{metric}": run.get(f"test_{metric}"),
                **{key: value for key, value in run.items() if key.startswith("test_")},
                "peak_act_mib": run["peak_activation_bytes"] / MiB,
                "imgs_per_s": run["imgs_per_s"],
                "train_s": run["train_s"],
                "run_dir": str(out_dir / run["run_dir"]),
            }
        )
        record["rows"].sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
        path.write_text(json.dumps(record, indent=2))

    runs = plan_runs(base, variants, [base.run.seed], out_dir / "runs")
    for run in runs:  # a finished row, read again from its run folder: rows follow the current record fields
        row = next((r for r in record["rows"] if r["method"] == run.variant.label), None)
        run_dir = out_dir / "runs" / Path(row["run_dir"]).name if row else None
        if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
            record["rows"].remove(row)
            finished(run_record(run, run_dir, out_dir))
    train_runs([run for run in runs if run.variant.label not in done], out_dir, workers, finished)
    rows = [r for r in record["rows"] if r["method"] in order]
    e2e = next((r for r in rows if r["method"] == "e2e"), None)
    table = _table(rows, e2e, metric)
    print("\n" + table)
    (out_dir / "compare.md").write_text(table + "\n")
    print(f"\nsaved {out_dir / 'compare.md'} and compare.json")
    return rows


def _table(rows: list[dict[str, Any]], e2e: dict[str, Any] | None, metric: str) -> str:
    """The compare table; ``metric`` is the task's headline (``acc``, ``psnr``, ``map``), labelled as in bench."""
    lines = [
        f"| method | K | test {METRIC_LABELS.get(metric, metric)} (final head) | peak activation MiB | vs E2E "
        "| images/s | vs E2E | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem_ratio = f"{r['peak_act_mib'] / e2e['peak_act_mib']:.3f}" if e2e else "-"
        speed_ratio = f"{r['imgs_per_s'] / e2e['imgs_per_s']:.3f}" if e2e else "-"
        value = r[f"test_{metric}"]
        test = "-" if value is None else format_metric(metric, value)
        lines.append(
            f"| {r['method']} | {r['k']} | {test} | {r['peak_act_mib']:.1f} | {mem_ratio} | "
            f"{r['imgs_per_s']:.0f} | {speed_ratio} | {seconds(r['train_s'])} |"
        )
    return "\n".join(lines)


def seconds(value: float) -> str:
    """Seconds for a table: one decimal under 10 s (a toy run's 0.4 s is not 0), whole seconds above."""
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def summary(config: str | None, overrides: list[str]) -> str:
    """Per module: units, parameters, forward GFLOPs and saved-activation MiB for one training batch, and the
    same for its aux net; totals, parameter/gradient/optimizer bytes, the method's saved-activation peak over a
    step and its training FLOPs. Estimated on the ``meta`` device (:mod:`locallearn.train.estimate`): no data
    files, no real storage, seconds for any preset."""
    cfg = load_config(config, overrides)
    spec = dataset_spec(cfg.data.name)
    if cfg.split.balance == "time" and cfg.split.preset == "auto":  # measured seconds need real tensors
        device = resolve_device(cfg.run.device)
        shape = meta_batch(cfg).input.shape
        sample = torch.zeros(shape, device=device).contiguous(memory_format=torch.channels_last)
        batch = Batch(
            sample, torch.zeros(shape[0], dtype=torch.long, device=device), torch.zeros_like(sample, dtype=torch.uint8)
        )
        cfg = resolve_time_balance(cfg, spec, device, [(batch.input, batch.target, batch.raw)], quiet=False)
    est = estimate_step(cfg)
    side = meta_batch(cfg).input.shape[-1]
    lines = [
        f"{cfg.model.name}, {cfg.method.name}, K={len(est.ends)}, batch {cfg.data.batch_size}, "
        f"{spec.channels}x{side}x{side} (estimated on the meta device)",
        "| module | units | params | GFLOPs fwd | saved act MiB | aux params | aux GFLOPs fwd | aux act MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, m in enumerate(est.modules):
        lines.append(
            f"| {k} | {m.units} | {m.params:,} | {m.fwd_flops / 1e9:.3f} | {m.act_bytes / MiB:.1f} | "
            f"{m.aux_params:,} | {m.aux_fwd_flops / 1e9:.3f} | {m.aux_act_bytes / MiB:.1f} |"
        )
    total = {
        key: sum(getattr(m, key) for m in est.modules) for key in ModuleEstimate.__dataclass_fields__ if key != "units"
    }
    lines.append(
        f"| total | {est.ends[-1]} | {total['params']:,} | {total['fwd_flops'] / 1e9:.3f} | "
        f"{total['act_bytes'] / MiB:.1f} | {total['aux_params']:,} | {total['aux_fwd_flops'] / 1e9:.3f} | "
        f"{total['aux_act_bytes'] / MiB:.1f} |"
    )
    forward = total["fwd_flops"] + total["aux_fwd_flops"]
    lines += [
        f"aux overhead: {100 * total['aux_params'] / max(total['params'], 1):.1f}% params, "
        f"{100 * total['aux_fwd_flops'] / max(total['fwd_flops'], 1):.1f}% forward FLOPs",
        f"training step ({cfg.method.name}): saved activations peak {est.step_act_peak / MiB:.1f} MiB; parameters "
        f"{est.state['param_bytes'] / MiB:.1f} MiB, gradients {est.state['grad_bytes'] / MiB:.1f} MiB, optimizer "
        f"state {est.state['optim_state_bytes'] / MiB:.1f} MiB ({cfg.optim.name}), frozen EMA copies "
        f"{est.state['frozen_param_bytes'] / MiB:.1f} MiB",
        f"training FLOPs per step: {est.train_flops / 1e9:.3f} G (forward, every backward, cascade hops, "
        f"recomputation) = {est.train_flops / max(forward, 1):.2f}x the forward of backbone and aux nets",
    ]
    text = "\n".join(lines)
    print(text)
    return text


def int_list(text: str | None, option: str) -> list[int]:
    """``"2,4,8"`` → [2, 4, 8] (None or empty → [])."""
    try:
        return [int(v) for v in (text or "").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated integers like 2,4,8, got {text!r}") from None


def bench_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """``locallearn bench pipeline``: see :mod:`locallearn.bench.pipeline`."""
    from ..bench.pipeline import ROW_KINDS, run_pipeline_bench
    from ..bench.report import command_line

    return run_pipeline_bench(
        args.config,
        args.overrides,
        k=args.k,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        micro=int_list(args.micro, "--micro") or None,
        simulate_ks=int_list(args.simulate, "--simulate"),
        simulate_only=args.simulate_only,
        out_dir=args.out,
        timeout=args.timeout,
        command=command_line(),
        kinds=[kind.strip() for kind in args.rows.split(",")] if args.rows else ROW_KINDS,
    )


def list_registries() -> None:
    print("models:   " + ", ".join(list_models()))
    print("methods:  " + ", ".join(list_methods()))
    print("add-ons:  " + ", ".join(ADDONS) + " (method.addons)")
    described = [
        f"{name} = " + " ".join(f"{key}={'+'.join(v) if isinstance(v, list) else v}" for key, v in options.items())
        for name, options in ADDON_PRESETS.items()
    ]
    print("  presets (--methods dgl+mlaan): " + "; ".join(described))
    print("datasets: " + ", ".join(list_datasets()))
    print("splits:   auto, ends, " + ", ".join(list_presets()))
    configs = next((d for d in (Path("configs"), Path(__file__).resolve().parents[3] / "configs") if d.is_dir()), None)
    if configs is not None:  # (a checkout; an installed wheel has no presets folder)
        print(f"presets:  {configs}/ (-c FILE)")
        for folder in sorted(d for d in configs.iterdir() if d.is_dir()):
            print(f"  {folder.name}/: " + ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))))
