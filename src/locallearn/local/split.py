"""Cut an ordered list of units into K contiguous, gradient-isolated local modules (spec methods.md §2.1, §10.1.2).

A split is the list of exclusive end indices of the modules; ``K = len(ends)`` is always the true module count.
Two ways to get one:

* a **preset** from the papers (``infopro``: ResNet-32/110, K = 2/3/4/8/16; ``infopro_star``: the
  "balanced memory" ResNet-110 splits of Table 3; ``infopro_star_stl10``; ``man``: ResNet-32 K=8/15, ResNet-110
  K=32/54 with the stem merged; ``manpp``: the same with the stem alone, K=9/16 and 33/55), written in the
  paper's ``[stage, block]`` notation and converted here. The papers' labels that differ from the true count
  (MAN "K=16" = 15 modules, MAN++ "K=8" = 9, ...) are accepted with a warning;
* an **automatic** split that balances a per-unit cost (unit count, parameters, FLOPs or saved-activation bytes;
  the engine measures the cost with :mod:`locallearn.measure`): the partition minimising the largest module cost,
  and among those the most even one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

_K8_R32 = [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)]
_MAN_R110_K32 = [
    (1, 1),
    (1, 2),
    (1, 4),
    (1, 5),
    (1, 7),
    (1, 9),
    (1, 11),
    (1, 13),
    (1, 14),
    (1, 16),
    (1, 17),
    (2, 1),
    (2, 2),
    (2, 4),
    (2, 5),
    (2, 7),
    (2, 9),
    (2, 11),
    (2, 13),
    (2, 14),
    (2, 16),
    (2, 17),
    (3, 1),
    (3, 3),
    (3, 4),
    (3, 6),
    (3, 7),
    (3, 9),
    (3, 11),
    (3, 13),
    (3, 15),
]
# The papers' K labels that are not the true module count (spec §3.1, §3.6-3): label → true count.
PAPER_K_ALIASES = {"man": {5: {16: 15}, 18: {55: 54}}, "manpp": {5: {8: 9}, 18: {32: 33}}}

# Split positions "[s, j]" = after block j of stage s; [0, 0] = after the stem. The last module is implicit.
_INFOPRO_POSITIONS: dict[str, dict[int, dict[int, list[tuple[int, int]]]]] = {
    "infopro": {
        5: {  # ResNet-32 (5 blocks per stage), InfoPro networks/configs.py
            2: [(2, 1)],
            3: [(1, 4), (2, 4)],
            4: [(1, 2), (2, 1), (3, 0)],
            8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
            16: [(0, 0)] + [(s, j) for s in (1, 2, 3) for j in range(5)][:-1],
        },
        18: {  # ResNet-110
            2: [(2, 8)],
            3: [(1, 17), (2, 17)],
            4: [(1, 11), (2, 7), (3, 3)],
            8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
            16: [
                (1, 1),
                (1, 4),
                (1, 7),
                (1, 10),
                (1, 13),
                (1, 16),
                (2, 1),
                (2, 4),
                (2, 7),
                (2, 11),
                (2, 15),
                (3, 1),
                (3, 5),
                (3, 9),
                (3, 13),
            ],
        },
    },
    "infopro_star": {18: {2: [(1, 14)], 3: [(1, 9), (2, 2)], 4: [(1, 6), (1, 14), (2, 8)]}},
    # MAN / HPFF / MLAAN (spec §3.1, §4.1, §5.1): the stem is merged into the first module.
    "man": {
        5: {8: _K8_R32, 15: [(s, j) for s in (1, 2, 3) for j in range(5)][:-1]},
        18: {32: _MAN_R110_K32, 54: [(s, j) for s in (1, 2, 3) for j in range(18)][:-1]},
    },
    # MAN++ (spec §3.1): the stem is a module of its own, in front of the MAN split.
    "manpp": {
        5: {9: [(0, 0), *_K8_R32], 16: [(0, 0)] + [(s, j) for s in (1, 2, 3) for j in range(5)][:-1]},
        18: {33: [(0, 0), *_MAN_R110_K32], 55: [(0, 0)] + [(s, j) for s in (1, 2, 3) for j in range(18)][:-1]},
    },
    "infopro_star_stl10": {18: {2: [(1, 14)], 3: [(1, 8), (2, 1)], 4: [(1, 6), (1, 14), (2, 8)]}},
}

BALANCE_MODES = ("units", "params", "flops", "activations")


def list_presets() -> list[str]:
    return sorted(_INFOPRO_POSITIONS)


def preset_split(preset: str, blocks_per_stage: int, k: int) -> list[int]:
    """End indices of a paper preset for a CIFAR ResNet with ``blocks_per_stage`` blocks (5 = ResNet-32)."""
    if preset not in _INFOPRO_POSITIONS:
        raise ValueError(f"unknown split preset {preset!r}; choose one of {list_presets()} or 'auto'")
    by_depth = _INFOPRO_POSITIONS[preset]
    if blocks_per_stage not in by_depth:
        depths = [6 * n + 2 for n in by_depth]
        raise ValueError(f"split preset {preset!r} exists only for ResNet-{depths}; use method.split=auto")
    if k == 1:
        return [1 + 3 * blocks_per_stage + 1]
    alias = PAPER_K_ALIASES.get(preset, {}).get(blocks_per_stage, {}).get(k)
    if alias is not None:
        warnings.warn(
            f"split {preset!r}: the paper's label K={k} is {alias} gradient-isolated modules; training "
            f"{alias} (set method.k={alias} to silence this)",
            stacklevel=2,
        )
        k = alias
    if k not in by_depth[blocks_per_stage]:
        raise ValueError(
            f"split preset {preset!r} has K in {sorted(by_depth[blocks_per_stage])}, not {k}; "
            "use method.split=auto for other K"
        )
    ends = [(0 if s == 0 else 1 + (s - 1) * blocks_per_stage + j) + 1 for s, j in by_depth[blocks_per_stage][k]]
    return ends + [1 + 3 * blocks_per_stage + 1]


def check_k(k: int, num_units: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"method.k must be an integer >= 1 (the number of local modules), got {k!r}")
    if k > num_units:
        raise ValueError(f"method.k={k} is more modules than the model has units ({num_units}); use k <= {num_units}")


def balanced_split(costs: Sequence[float], k: int) -> list[int]:
    """Contiguous partition of ``costs`` into ``k`` non-empty groups; returns exclusive end indices.

    Minimises the largest group cost (the bottleneck module), then the sum of squared group costs among
    partitions with that bottleneck, so equal costs give groups within one unit of each other.
    """
    n = len(costs)
    check_k(k, n)
    prefix = [0.0]
    for c in costs:
        if c < 0:
            raise ValueError("unit costs must be non-negative")
        prefix.append(prefix[-1] + float(c))

    def solve(score, limit: float | None) -> list[int]:
        inf = float("inf")
        # best[j][i]: best score of splitting the first i units into j groups; arg keeps the last cut.
        best = [[inf] * (n + 1) for _ in range(k + 1)]
        arg = [[0] * (n + 1) for _ in range(k + 1)]
        best[0][0] = 0.0
        for j in range(1, k + 1):
            for i in range(j, n - (k - j) + 1):
                for m in range(j - 1, i):
                    if best[j - 1][m] == inf:
                        continue
                    group = prefix[i] - prefix[m]
                    if limit is not None and group > limit:
                        continue
                    value = score(best[j - 1][m], group)
                    if value < best[j][i]:
                        best[j][i], arg[j][i] = value, m
        ends, i = [], n
        for j in range(k, 0, -1):
            ends.append(i)
            i = arg[j][i]
        return ends[::-1]

    ends = solve(lambda acc, g: max(acc, g), None)
    bottleneck = max(prefix[e] - prefix[s] for s, e in zip([0] + ends[:-1], ends))
    return solve(lambda acc, g: acc + g * g, bottleneck * (1 + 1e-9) + 1e-12)


def module_sizes(ends: Sequence[int]) -> list[int]:
    return [e - s for s, e in zip([0, *ends[:-1]], ends)]


def validate_ends(ends: Sequence[int], num_units: int) -> list[int]:
    """Check user-given end indices: strictly increasing, positive, last == number of units."""
    ends = [int(e) for e in ends]
    if not ends or ends[-1] != num_units or any(b <= a for a, b in zip([0, *ends[:-1]], ends)):
        raise ValueError(
            f"split ends {ends} must be strictly increasing and end at the unit count {num_units}, "
            "e.g. [3, 7, 12, 17] for 4 modules over 17 units"
        )
    return ends
