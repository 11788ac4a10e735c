"""Pool the two passes of each split in ``benchmarks/pipeline_fmnist_k2_stages/split_r32/`` (10 rounds each):
medians of the per-round ratios with their 95 % intervals (``median_interval``), and the median busy fraction per
stage of PPLL.

Run from the repository root: ``python benchmarks/scripts/pipeline_fmnist_k2_stages__pool_split_r32.py``.
"""

import json
import statistics
from pathlib import Path

from locallearn.bench.pipeline import median_interval

HERE = Path(__file__).parent.parent / "pipeline_fmnist_k2_stages" / "split_r32"


def main() -> None:
    for ends in (7, 8):
        seq, ceiling, vs_ceiling, busy = [], [], [], []
        for run in (1, 2):
            results = json.loads((HERE / f"ends{ends}_pass{run}" / "results.json").read_text())
            rows = {row["kind"]: row["rounds"] for row in results["rows"]}
            for solo, ppll, indep in zip(rows["solo"], rows["ppll"], rows["independent"]):
                seq.append(ppll["samples_per_s"] / solo["samples_per_s"])
                ceiling.append(indep["samples_per_s"] / solo["samples_per_s"])
                vs_ceiling.append(ppll["samples_per_s"] / indep["samples_per_s"])
                busy.append(ppll["busy_fraction"])

        def show(values: list[float]) -> str:
            low, high = median_interval(values)
            return f"{statistics.median(values):.3f} ({low:.3f}-{high:.3f})"

        stages = " / ".join(f"{statistics.median(b[k] for b in busy):.3f}" for k in (0, 1))
        print(
            f"[{ends}, 17], {len(seq)} rounds: ppll/sequential {show(seq)}, ceiling {show(ceiling)}, "
            f"ppll/ceiling {show(vs_ceiling)}, ppll busy {stages}"
        )


if __name__ == "__main__":
    main()
