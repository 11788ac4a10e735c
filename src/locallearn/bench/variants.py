"""The rows of a benchmark or comparison: a base method, add-on presets, a split preset and K.

One syntax for ``locallearn compare --methods`` and ``locallearn bench --methods``: ``name[+addon...][:split]``,
e.g. ``dgl+man``, ``infopro+hpff``, ``infopro:infopro_star`` (add-ons are :data:`ADDON_PRESETS`, and the run
presets of :data:`RUN_PRESETS`: ``dgl+compile``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..methods.base import list_methods
from ..methods.options import ADDON_PRESETS
from ..names import unknown_name
from ..train.config import ConfigError, TrainCfg, apply_overrides, config_from_dict, to_dict

# Row presets that change how a row runs, not what it trains: ``dgl+compile`` beside ``dgl`` times torch.compile.
RUN_PRESETS: dict[str, list[str]] = {"compile": ["run.compile=true"]}


@dataclass(frozen=True)
class Variant:
    """One row of the table: a base method, the add-on presets on it (``ADDON_PRESETS``: ``dgl+man``), an
    optional split preset for it, and K."""

    method: str
    split: str | None
    k: int
    addons: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        name = "+".join([self.method, *self.addons])
        return name if self.split is None else f"{name}:{self.split}"

    @property
    def key(self) -> str:
        return f"{self.label}|k{self.k}"

    def overrides(self) -> list[str]:
        presets = [
            item
            for name in self.addons
            for item in RUN_PRESETS.get(name)
            or [f"method.{key}={json.dumps(value)}" for key, value in ADDON_PRESETS[name].items()]
        ]
        # A row runs what its label says: the config's own add-ons are cleared, the label's presets set them.
        if self.method == "e2e":  # one module is the whole network whatever the split says
            return [
                "method.name=e2e",
                "split.k=1",
                "split.preset=auto",
                "split.ends=[]",
                "split.cuts=[]",
                "method.addons=[]",
                *presets,
            ]
        return (
            [f"method.name={self.method}", f"split.k={self.k}", "method.addons=[]"]
            + ([f"split.preset={self.split}"] if self.split else [])
            + presets
        )


def parse_method(token: str) -> tuple[str, tuple[str, ...], str | None]:
    """``"infopro+hpff:infopro_star"`` → ("infopro", ("hpff",), "infopro_star"): base method, add-on presets
    (``ADDON_PRESETS``), split preset. The one method syntax of ``compare`` and ``bench``."""
    spec, _, split = token.partition(":")
    name, *addons = spec.split("+")
    if name not in list_methods():
        raise ConfigError(unknown_name("method", name, list_methods(), " in --methods"))
    for addon in addons:
        if addon not in ADDON_PRESETS and addon not in RUN_PRESETS:
            known = [*ADDON_PRESETS, *RUN_PRESETS]
            raise ConfigError(unknown_name("add-on preset", addon, known, f" in {token!r} (e.g. dgl+man)"))
    if name == "e2e" and any("addons" in ADDON_PRESETS.get(a, {}) for a in addons):
        raise ConfigError(f"{token!r}: add-ons act on local modules; e2e has one module (use dgl+... or infopro+...)")
    return name, tuple(addons), split or None


def parse_variants(methods: list[str], ks: list[int]) -> list[Variant]:
    """``["e2e", "infopro", "dgl+man", "infopro:infopro_star"]`` × ``ks`` → variants (e2e once, with K=1)."""
    if not methods:
        raise ConfigError("--methods is empty; e.g. --methods e2e,dgl,infopro,dgl+man")
    out: list[Variant] = []
    for token in methods:
        name, addons, split = parse_method(token)
        for k in [1] if name == "e2e" else ks:
            v = Variant(name, split, k, addons)
            if v not in out:
                out.append(v)
    return out


def variant_config(base: TrainCfg, variant: Variant, extra: list[str] = ()) -> TrainCfg:
    return config_from_dict(apply_overrides(to_dict(base), [*variant.overrides(), *extra]))
