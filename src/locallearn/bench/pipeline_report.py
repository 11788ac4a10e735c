"""``results.md`` of ``locallearn bench pipeline``, rendered from its ``results.json`` (a partial record, after any
finished round, renders too)."""

from __future__ import annotations

from typing import Any

from .report import load_text


def _f(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _busy(values: list[float | None] | None) -> str:
    if not values or all(v is None for v in values):
        return "-"
    return " / ".join(_f(v, ".2f") for v in values)


def _header(results: dict[str, Any]) -> str:
    cfg, m = results["config"], results.get("machine", {})
    send = cfg.get("ppll", {}).get("labels") == "send"
    labels = "sent by stage 0 with the activations (ppll.labels=send)" if send else "held by every rank"
    return (
        f"{cfg['model']['name']} (width {cfg['model']['width']}), {cfg['data']['name']}, global batch "
        f"{results['batch_size']}, {cfg['method']['name']} split into K={results['k']} stages ending at units "
        f"{results['module_ends']}, {results['threads_per_process']} thread(s) per process, PPLL targets "
        f"{labels}; {results['warmup']} warm-up + {results['steps']} timed steps, median of {results['repeats']} "
        f"round(s). torch {m.get('torch', '?')}, git {m.get('git', '?')}, {m.get('cpu', '?')} "
        f"({m.get('cpu_count', '?')} CPUs)."
    )


def _measured(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| run (processes × threads) | samples/s (min–max) | step ms | fill s | busy fraction per stage "
        "| predicted samples/s | predicted / measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if "samples_per_s" not in r:
            continue
        pred = r.get("predicted_samples_per_s")
        lines.append(
            f"| {r['label']} | {r['samples_per_s']:.1f} ({r['samples_per_s_min']:.1f}–{r['samples_per_s_max']:.1f}) "
            f"| {r['step_ms']:.1f} | {r['fill_s']:.3f} | {_busy(r['busy_fraction'])} | {_f(pred, '.1f')} "
            f"| {_f(None if pred is None else pred / r['samples_per_s'], '.2f')} |"
        )
    columns = results.get("ratio_columns")
    if columns:
        lines += [
            "",
            "Ratios (median over rounds of the per-round ratio of samples/s):",
            "",
            "| run | " + " | ".join(f"vs {c}" for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for r in results["rows"]:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['ratios'][c]:.3f}" for c in columns) + " |")
        intervals = results.get("headline_ci95", {})
        lines += ["", f"Headline ratios, medians over {results['repeats']} rounds:", ""]
        for name, value in results["headline"].items():
            ci = intervals.get(name)
            spread = "" if ci is None else f" (95 % confidence interval of the median {ci[0]:.3f}–{ci[1]:.3f})"
            lines.append(f"- {name}: **{value:.3f}×**{spread}")
    return lines


def _simulation(results: dict[str, Any]) -> list[str]:
    lines = []
    for k, sim in results.get("simulation", {}).items():
        c = sim["costs"]
        ms = sim["micro"]
        lines += [
            "",
            f"Simulation, K={k}, stages ending at units {c.get('ends', '?')} (stage times measured in one process "
            f"with {results['threads_per_process']} "
            f"thread(s) while other processes used {_f(sim.get('foreign_cores'), '.2f')} cores; transfers between "
            "two processes; ms):",
            "",
            "| stage | LL step (fwd+aux+bwd+opt) | E2E fwd+bwd, whole batch | "
            + "".join(f"fwd+bwd per micro-batch, M={m} | " for m in ms)
            + "optimizer | transfer out, whole batch |",
            "|---|---|---|" + "---|" * len(ms) + "---|---|",
        ]
        comm = c["comm"]
        for s in range(len(c["ll"])):
            cells = [c["ll"][s], c["fwd"]["1"][s] + c["bwd"]["1"][s]]
            cells += [c["fwd"][str(m)][s] + c["bwd"][str(m)][s] for m in ms]
            cells += [c["opt"][s], comm["1"][s] if s < len(comm["1"]) else None]
            lines.append(f"| {s} | " + " | ".join(_f(None if v is None else 1000 * v, ".2f") for v in cells) + " |")
        pred = sim["predicted_samples_per_s"]
        seq = pred["sequential"]
        if results.get("cross_stage_messages"):
            lines += [
                "",
                "This method also sends messages upstream (EMA weights of later units, cascade gradients); the "
                "simulation counts activations only, so its PPLL prediction is an upper bound.",
            ]
        lines += [
            "",
            f"Predicted samples/s at K={k} (PPLL fill {sim['ppll_fill_s']:.3f} s, paid once):",
            "",
            "| run | predicted samples/s | vs sequential LL | vs E2E |",
            "|---|---|---|---|",
        ]
        lines += [f"| {n} | {v:.1f} | {v / seq:.3f} | {v / pred['e2e']:.3f} |" for n, v in pred.items()]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    lines = [_header(results)]
    if results["rows"]:
        lines += _measured(results)
    lines += _simulation(results)
    foreign = [r["foreign_cores"] for row in results["rows"] for r in row.get("rounds", [])]
    foreign = [f for f in foreign if f is not None]
    m = results.get("machine", {})
    notes = [f"input: {results['data']}"]
    if foreign:
        notes.append(
            f"CPU used by other processes during the rounds: {min(foreign):.2f}–{max(foreign):.2f} cores "
            "(multi-process rows are unreliable above ~0.1)"
        )
    notes.append(f"load average {load_text(m.get('load_avg'))} → {load_text(m.get('load_avg_end'))}")
    notes.append(
        "fill = seconds from the start barrier until every rank finished step 1 (pipeline fill + lazy init); "
        "busy fraction = compute seconds / wall per rank after warm-up (none for DDP and one-process rows; for the "
        "stages alone, each stage's step time / the slowest's)"
    )
    if results.get("command"):
        notes.append(f"command: `{results['command']}`")
    return "\n".join([*lines, "", *[f"- {n}" for n in notes]])
