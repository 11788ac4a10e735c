"""Per-seed values and mean ± sample std of the final test metric (and aux metric by depth) from bench
``results.json`` files (pooled, so seeds kept in separate folders combine).

    python benchmarks/scripts/detection_shapes__seed_table.py benchmarks/detection_shapes/results.json
    python benchmarks/scripts/detection_shapes__seed_table.py benchmarks/sr_glcan/results.json \
        benchmarks/sr_glcan/seed1/results.json

Several files are pooled by (method, K, seed); a (method, K, seed) found twice is an error. Stdlib only.
"""

import json
import statistics
import sys
from collections import defaultdict


def main(paths: list[str]) -> None:
    runs: dict[tuple, dict] = {}
    order: list[tuple] = []
    for path in paths:
        with open(path) as f:
            records = json.load(f)["runs"]
        for r in records:
            key = (r["label"], r["k"], r["seed"])
            if key in runs:
                raise SystemExit(f"{key} appears twice ({path})")
            runs[key] = r
            if key[:2] not in order:
                order.append(key[:2])
    metric = next(iter(runs.values()))["metric"]
    extra = [f"test_{metric}50"] if metric == "map" else ["test_ssim"]
    fmt = "{:.3f}" if metric == "map" else "{:.2f}"
    fmts = {c: ("{:.4f}" if c == "test_ssim" else fmt) for c in [f"test_{metric}", *extra]}
    by = defaultdict(list)
    for key, r in sorted(runs.items()):
        by[key[:2]].append(r)
    cols = [f"test_{metric}", *extra]
    print(
        "| method | K | n | seeds | "
        + " | ".join(f"{c} per seed" for c in cols)
        + " | "
        + " | ".join(f"{c} mean ± std" for c in cols)
        + f" | aux_{metric} mean by depth |"
    )
    print("|" + "---|" * (4 + 2 * len(cols) + 1))
    for label, k in order:
        rs = by[(label, k)]
        cells = []
        for c in cols:
            cells.append(" / ".join(fmts[c].format(r[c]) for r in rs if c in r))
        stats = []
        for c in cols:
            v = [r[c] for r in rs if c in r]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            stats.append(f"{fmts[c].format(statistics.fmean(v))} ± {fmts[c].format(sd)}")
        aux = [r[f"aux_{metric}"] for r in rs if r.get(f"aux_{metric}")]
        auxm = " / ".join(fmt.format(statistics.fmean(a[i] for a in aux)) for i in range(len(aux[0]))) if aux else ""
        print(
            f"| {label} | {k} | {len(rs)} | {','.join(str(r['seed']) for r in rs)} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(stats)
            + f" | {auxm} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
