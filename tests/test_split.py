"""Splits: the InfoPro presets match InfoPro's ``networks/configs.py`` table by table; automatic splits are
contiguous, cover every unit, and are balanced (property-based). Where each paper preset comes from:
(docs/methods.md, "Where the paper presets come from")."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from locallearn import create_model
from locallearn.local.split import balanced_split, module_sizes, preset_split, validate_ends
from locallearn.train.config import SplitCfg
from locallearn.train.split import resolve_split


def names(model: str, ends: list[int]) -> list[str]:
    """Each module as 'first..last' unit names, to compare with the reference split tables."""
    infos = create_model(model).infos
    return [f"{infos[s].name}..{infos[e - 1].name}" for s, e in zip([0, *ends[:-1]], ends)]


SPEC_TABLES = {  # InfoPro's networks/configs.py, with the head (GAP+FC) in the last module
    ("resnet32", "infopro", 2): ["stem..layer2.1", "layer2.2..head"],
    ("resnet32", "infopro", 3): ["stem..layer1.4", "layer2.0..layer2.4", "layer3.0..head"],
    ("resnet32", "infopro", 4): ["stem..layer1.2", "layer1.3..layer2.1", "layer2.2..layer3.0", "layer3.1..head"],
    ("resnet32", "infopro", 8): [
        "stem..layer1.0",
        "layer1.1..layer1.2",
        "layer1.3..layer1.4",
        "layer2.0..layer2.1",
        "layer2.2..layer2.3",
        "layer2.4..layer3.0",
        "layer3.1..layer3.2",
        "layer3.3..head",
    ],
    ("resnet110", "infopro", 2): ["stem..layer2.8", "layer2.9..head"],
    ("resnet110", "infopro", 3): ["stem..layer1.17", "layer2.0..layer2.17", "layer3.0..head"],
    ("resnet110", "infopro", 4): ["stem..layer1.11", "layer1.12..layer2.7", "layer2.8..layer3.3", "layer3.4..head"],
    ("resnet110", "infopro", 8): [
        "stem..layer1.4",
        "layer1.5..layer1.11",
        "layer1.12..layer2.0",
        "layer2.1..layer2.7",
        "layer2.8..layer2.14",
        "layer2.15..layer3.3",
        "layer3.4..layer3.10",
        "layer3.11..head",
    ],
    ("resnet110", "infopro", 16): [
        "stem..layer1.1",
        "layer1.2..layer1.4",
        "layer1.5..layer1.7",
        "layer1.8..layer1.10",
        "layer1.11..layer1.13",
        "layer1.14..layer1.16",
        "layer1.17..layer2.1",
        "layer2.2..layer2.4",
        "layer2.5..layer2.7",
        "layer2.8..layer2.11",
        "layer2.12..layer2.15",
        "layer2.16..layer3.1",
        "layer3.2..layer3.5",
        "layer3.6..layer3.9",
        "layer3.10..layer3.13",
        "layer3.14..head",
    ],
    ("resnet110", "infopro_star", 2): ["stem..layer1.14", "layer1.15..head"],
    ("resnet110", "infopro_star", 3): ["stem..layer1.9", "layer1.10..layer2.2", "layer2.3..head"],
    ("resnet110", "infopro_star", 4): [
        "stem..layer1.6",
        "layer1.7..layer1.14",
        "layer1.15..layer2.8",
        "layer2.9..head",
    ],
    ("resnet110", "infopro_star_stl10", 3): ["stem..layer1.8", "layer1.9..layer2.1", "layer2.2..head"],
}


@pytest.mark.parametrize("key", list(SPEC_TABLES), ids=lambda k: "-".join(map(str, k)))
def test_presets_match_spec_tables(key: tuple[str, str, int]) -> None:
    model, preset, k = key
    blocks = {"resnet32": 5, "resnet110": 18}[model]
    ends = preset_split(preset, blocks, k)
    assert len(ends) == k
    assert names(model, ends) == SPEC_TABLES[key]


IMAGENET_TABLES = {  # InfoPro*, MAN, MAN++ ViT, HPFF (docs/methods.md, "Where the paper presets come from"); head last
    ("resnet101", "infopro_star", 2): ["stem..layer2.0", "layer2.1..head"],
    ("resnet152", "infopro_star", 2): ["stem..layer2.5", "layer2.6..head"],
    ("resnet101", "man", 2): ["stem..layer2.0", "layer2.1..head"],
    ("resnet101", "man", 4): ["stem..layer2.2", "layer2.3..layer3.8", "layer3.9..layer3.16", "layer3.17..head"],
    ("resnet152", "man", 4): ["stem..layer2.6", "layer2.7..layer3.13", "layer3.14..layer3.25", "layer3.26..head"],
    ("resnet152", "hpff", 4): ["stem..layer3.0", "layer3.1..layer3.9", "layer3.10..layer3.17", "layer3.18..head"],
    ("resnet34", "hpff", 4): ["stem..layer2.0", "layer2.1..layer3.0", "layer3.1..layer3.5", "layer4.0..head"],
    ("resnet101", "hpff", 8): [
        "stem..layer2.0",
        "layer2.1..layer3.1",
        *[f"layer3.{a}..layer3.{a + 3}" for a in (2, 6, 10, 14, 18)],
        "layer3.22..head",
    ],
    ("vit_base", "manpp", 4): ["patch_embed..blocks.2", "blocks.3..blocks.5", "blocks.6..blocks.8", "blocks.9..head"],
}


@pytest.mark.parametrize("key", list(IMAGENET_TABLES), ids=lambda k: "-".join(map(str, k)))
def test_imagenet_and_vit_presets_match_spec_tables(key: tuple[str, str, int]) -> None:
    model, preset, k = key
    backbone = create_model(model, width=32 if model.startswith("vit") else 4)  # thin: only the unit names matter
    ends = resolve_split(backbone, SplitCfg(k=k, preset=preset), "dgl")
    infos = backbone.infos
    assert [f"{infos[s].name}..{infos[e - 1].name}" for s, e in zip([0, *ends[:-1]], ends)] == IMAGENET_TABLES[key]


def test_resnet32_k16_is_stem_then_one_block_each() -> None:
    ends = preset_split("infopro", 5, 16)
    assert module_sizes(ends) == [1] * 15 + [2]  # the last block shares its module with the head
    assert names("resnet32", ends)[0] == "stem..stem"


def test_preset_errors() -> None:
    with pytest.raises(ValueError, match="has K in"):
        preset_split("infopro", 5, 5)
    with pytest.raises(ValueError, match="only for ResNet"):
        preset_split("infopro_star", 5, 2)
    with pytest.raises(ValueError, match="unknown split preset"):
        preset_split("infopro*", 18, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        validate_ends([3, 3, 17], 17)
    with pytest.raises(ValueError, match="end at the unit count"):
        validate_ends([3, 9], 17)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_unit_balanced_split_is_contiguous_covering_and_within_one(nk: tuple[int, int]) -> None:
    n, k = nk
    ends = balanced_split([1.0] * n, k)
    sizes = module_sizes(ends)
    assert len(ends) == k and ends[-1] == n and all(s >= 1 for s in sizes)
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=9).flatmap(
        lambda c: st.tuples(st.just(c), st.integers(1, len(c)))
    )
)
def test_weighted_split_minimises_the_bottleneck(case: tuple[list[int], int]) -> None:
    costs, k = case
    ends = balanced_split(costs, k)
    cost = max(sum(costs[s:e]) for s, e in zip([0, *ends[:-1]], ends))
    best = min(
        max(sum(costs[s:e]) for s, e in zip((0, *cuts), (*cuts, len(costs))))
        for cuts in itertools.combinations(range(1, len(costs)), k - 1)
    )
    assert cost == best


@pytest.mark.parametrize("balance", ["params", "flops", "activations"])
def test_measured_balance_moves_cuts_and_leaves_the_model_alone(balance: str) -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(4, 3, 32, 32)
    ends = resolve_split(model, SplitCfg(k=4, balance=balance), "dgl", sample)
    assert len(ends) == 4 and ends[-1] == len(model)
    assert ends != resolve_split(model, SplitCfg(k=4, balance="units"), "dgl")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
