"""Cut an ordered list of units into K contiguous, gradient-isolated local modules (docs/methods.md, "Splits").

A split is the list of exclusive end indices of the modules; ``K = len(ends)`` is always the true module count.
Two ways to get one:

* a **preset** from the papers, written in the paper's ``[stage, block]`` notation and converted here. Presets are
  looked up per backbone *layout* (blocks per stage, read from the units' :class:`UnitInfo`), so one name covers
  every family that has it:

  - CIFAR ResNet-32/110: ``infopro`` (K = 2/3/4/8/16), ``infopro_star`` and
    ``infopro_star_stl10`` (the "balanced memory" ResNet-110 splits of Table 3), ``man`` (ResNet-32 K=8/15,
    ResNet-110 K=32/54, stem merged), ``manpp`` (the same with the stem alone, K=9/16 and 33/55);
  - ImageNet ResNets: ``infopro_star`` K=2 (ResNet-101/152, Table 4), ``man`` K=2/4
    (ResNet-101/152; K=4 is MAN++'s config), ``hpff`` K=4/8 (ResNet-101/152) and K=4 (ResNet-34), ``mlaan``
    (one module per block: ResNet-34 K=16, ResNet-101 K=33). ResNet-50 shares ResNet-34's layout (3, 4, 6, 3) and
    so its presets, as MAN's ImageNet code does; ResNet-18 has none;
  - a 12-block ViT (MAN++'s): ``manpp`` K=4, four groups of three blocks (patch embedding in the first, head in
    the last).

  The papers' labels that differ from the true count (MAN "K=16" = 15 modules, MAN++ "K=8" = 9, MLAAN's ResNet-101
  "K=34" = 33, ...) are accepted with a warning. Where each preset comes from: docs/methods.md, "Where the paper
  presets come from";
* an **automatic** split that balances a per-unit cost (unit count, parameters, FLOPs or saved-activation bytes;
  the engine measures the cost with :mod:`locallearn.measure`): the partition minimising the largest module cost,
  and among those the most even one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..models.imagenet_resnet import LAYERS as IMAGENET_LAYERS
from ..models.units import UnitInfo
from ..names import unknown_name

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
Position = tuple[int, int]  # [stage, block]: after block j of stage s; (0, 0) = after the stem / patch embedding
Layout = tuple[int, ...]  # blocks per stage: (5, 5, 5) ResNet-32, (3, 4, 23, 3) ResNet-101, (12,) a 12-block ViT

_R32, _R110 = (5, 5, 5), (18, 18, 18)
_R34, _R101, _R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)
_VIT12 = (12,)


def _every_block(layout: Layout) -> list[Position]:
    """One module per block, the stem merged into the first and the head into the last (MAN K=15/54, MLAAN)."""
    return [(s, j) for s, n in enumerate(layout, start=1) for j in range(n)][:-1]


# The papers' K labels that are not the true module count (docs/methods.md, "Splits"): label → true count.
_K_ALIASES: dict[str, dict[Layout, dict[int, int]]] = {
    "man": {_R32: {16: 15}, _R110: {55: 54}},
    "manpp": {_R32: {8: 9}, _R110: {32: 33}},
    "mlaan": {_R101: {34: 33}},  # MLAAN's README says "K=34" for ResNet-101; the config key is 33
}
# The CIFAR view (by blocks per stage), as methods.infopro's legacy MAN λ ratio reads it.
PAPER_K_ALIASES = {
    name: {layout[0]: labels for layout, labels in by_layout.items() if len(layout) == 3}
    for name, by_layout in _K_ALIASES.items()
}

# Split positions per preset and layout; the last module is implicit.
_PRESETS: dict[str, dict[Layout, dict[int, list[Position]]]] = {
    "infopro": {
        _R32: {  # InfoPro's networks/configs.py
            2: [(2, 1)],
            3: [(1, 4), (2, 4)],
            4: [(1, 2), (2, 1), (3, 0)],
            8: _K8_R32,
            16: [(0, 0), *_every_block(_R32)],
        },
        _R110: {
            2: [(2, 8)],
            3: [(1, 17), (2, 17)],
            4: [(1, 11), (2, 7), (3, 3)],
            8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
            16: [
                *[(1, j) for j in (1, 4, 7, 10, 13, 16)],
                *[(2, j) for j in (1, 4, 7, 11, 15)],
                *[(3, j) for j in (1, 5, 9, 13)],
            ],
        },
    },
    "infopro_star": {
        _R110: {2: [(1, 14)], 3: [(1, 9), (2, 2)], 4: [(1, 6), (1, 14), (2, 8)]},
        # ImageNet InfoPro* K=2 (InfoPro's k2_infopro, Table 4): stem + layer1 + layer2[0..k] | the rest.
        _R101: {2: [(2, 0)]},
        _R152: {2: [(2, 5)]},
    },
    "infopro_star_stl10": {_R110: {2: [(1, 14)], 3: [(1, 8), (2, 1)], 4: [(1, 6), (1, 14), (2, 8)]}},
    # MAN / HPFF / MLAAN (MAN's networks/config.py): the stem is merged into the first module.
    "man": {
        _R32: {8: _K8_R32, 15: _every_block(_R32)},
        _R110: {32: _MAN_R110_K32, 54: _every_block(_R110)},
        # ImageNet: K=2 from MAN, K=4 from MAN++'s configs (the K MAN's tables report).
        _R101: {2: [(2, 0)], 4: [(2, 2), (3, 8), (3, 16)]},
        _R152: {2: [(2, 5)], 4: [(2, 6), (3, 13), (3, 25)]},
    },
    # MAN++ (its networks/config.py and vit_man.py): the stem is a module of its own, in front of the MAN split;
    # ViT: 4 groups of 3 blocks.
    "manpp": {
        _R32: {9: [(0, 0), *_K8_R32], 16: [(0, 0), *_every_block(_R32)]},
        _R110: {33: [(0, 0), *_MAN_R110_K32], 55: [(0, 0), *_every_block(_R110)]},
        _VIT12: {4: [(1, 2), (1, 5), (1, 8)]},
    },
    # HPFF ImageNet (its networks/configs.py); the ResNet-34 entry is unusable in the reference (hard-coded
    # widths), not here.
    "hpff": {
        _R34: {4: [(2, 0), (3, 0), (3, 5)]},
        **{
            layout: {
                4: [(3, 0), (3, 9), (3, 17)],
                8: [(2, 0), (3, 1), (3, 5), (3, 9), (3, 13), (3, 17), (3, 21)],
            }
            for layout in (_R101, _R152)
        },
    },
    # MLAAN ImageNet (its networks/configs.py): one module per residual block (no split config exists for ResNet-152).
    "mlaan": {_R34: {16: _every_block(_R34)}, _R101: {33: _every_block(_R101)}},
}

BALANCE_MODES = ("units", "params", "flops", "activations")


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def backbone_layout(infos: Sequence[UnitInfo]) -> Layout | None:
    """Blocks per stage of a stem / blocks / head unit list (the presets' coordinates), or None if the units do
    not have that shape (e.g. a user's ``nn.Sequential``)."""
    if len(infos) < 3 or infos[0].stage != 0 or not infos[-1].is_head:
        return None
    stages = [info.stage for info in infos[1:-1]]
    if any(info.is_head for info in infos[1:-1]) or stages != sorted(stages) or stages[0] != 1:
        return None
    if set(stages) != set(range(1, stages[-1] + 1)):
        return None
    return tuple(stages.count(s) for s in range(1, stages[-1] + 1))


def layout_name(layout: Layout) -> str:
    """``ResNet-110``, ``ResNet-34/50``, ``ViT (12 blocks)``: how error messages name a layout."""
    if len(layout) == 3 and len(set(layout)) == 1:
        return f"ResNet-{6 * layout[0] + 2}"
    if len(layout) == 4:
        depths = [str(d) for d, (_, blocks) in IMAGENET_LAYERS.items() if blocks == layout]
        if depths:
            return "ResNet-" + "/".join(depths)
    if len(layout) == 1:
        return f"ViT ({layout[0]} blocks)"
    return f"the backbone with blocks per stage {layout}"


def presets_for(layout: Layout | None) -> dict[str, list[int]]:
    """The presets defined for a layout and their K (true module counts)."""
    return {name: sorted(by[layout]) for name, by in sorted(_PRESETS.items()) if layout in by}


def preset_split(preset: str, layout: int | Layout | None, k: int) -> list[int]:
    """End indices of a paper preset for a backbone of ``layout`` (blocks per stage; an int n is the CIFAR
    ResNet with n blocks in each of its 3 stages, 5 = ResNet-32). Unit 0 is the stem, the last is the head."""
    if preset not in _PRESETS:
        raise ValueError(unknown_name("split preset", preset, [*list_presets(), "auto"]))
    if isinstance(layout, int):
        layout = (layout,) * 3
    by_layout = _PRESETS[preset]
    if layout is None or layout not in by_layout:
        where = ", ".join(layout_name(lay) for lay in by_layout)
        if layout is None:
            this = "this backbone is not a stem / blocks-by-stage / head unit list"
        else:
            available = ", ".join(f"{name} (K {ks})" for name, ks in presets_for(layout).items()) or "none"
            this = f"presets for {layout_name(layout)}: {available}"
        raise ValueError(f"split preset {preset!r} exists only for {where} ({this}); use split.preset=auto")
    units = sum(layout) + 2
    if k == 1:
        return [units]
    alias = _K_ALIASES.get(preset, {}).get(layout, {}).get(k)
    if alias is not None:
        warnings.warn(
            f"split {preset!r}: the paper's label K={k} is {alias} gradient-isolated modules; training "
            f"{alias} (set split.k={alias} to silence this)",
            stacklevel=2,
        )
        k = alias
    if k not in by_layout[layout]:
        raise ValueError(
            f"split preset {preset!r} has K in {sorted(by_layout[layout])}, not {k}; use split.preset=auto for other K"
        )
    starts = [1 + sum(layout[:s]) for s in range(len(layout))]  # unit index of block 0 of each stage
    ends = [(0 if s == 0 else starts[s - 1] + j) + 1 for s, j in by_layout[layout][k]]
    return ends + [units]


def check_k(k: int, num_units: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"split.k must be an integer >= 1 (the number of local modules), got {k!r}")
    if k > num_units:
        raise ValueError(f"split.k={k} is more modules than the model has units ({num_units}); use k <= {num_units}")


def balanced_split(costs: Sequence[float], k: int, end_costs: Sequence[float] | None = None) -> list[int]:
    """Contiguous partition of ``costs`` into ``k`` non-empty groups; returns exclusive end indices.

    Minimises the largest group cost (the bottleneck module), then the sum of squared group costs among
    partitions with that bottleneck, so equal costs give groups within one unit of each other. ``end_costs[u]``
    is added to a group that ends at unit u (the aux net a module closing there needs).
    """
    n = len(costs)
    check_k(k, n)
    ends_cost = [0.0] * n if end_costs is None else [float(c) for c in end_costs]
    if len(ends_cost) != n:
        raise ValueError(f"end_costs has {len(ends_cost)} entries for {n} units")
    prefix = [0.0]
    for c in [*costs, *ends_cost]:
        if c < 0:
            raise ValueError("unit costs must be non-negative")
    for c in costs:
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
                    group = prefix[i] - prefix[m] + ends_cost[i - 1]
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
    bottleneck = max(prefix[e] - prefix[s] + ends_cost[e - 1] for s, e in zip([0] + ends[:-1], ends))
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
