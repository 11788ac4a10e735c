"""Model registry: ``@register_model("name")`` on a builder, ``create_model(name, **kw)`` to build (timm style).

Builders return a :class:`~locallearn.models.units.UnitBackbone`: an ordered list of units that local learning
cuts into modules. No ``exec``/``eval``: names map to functions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from .units import UnitBackbone

_MODELS: dict[str, Callable[..., UnitBackbone]] = {}


def register_model(name: str) -> Callable[[Callable[..., UnitBackbone]], Callable[..., UnitBackbone]]:
    def wrap(fn: Callable[..., UnitBackbone]) -> Callable[..., UnitBackbone]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> UnitBackbone:
    if name not in _MODELS:
        hint = difflib.get_close_matches(name, _MODELS, n=1)
        more = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"unknown model {name!r}{more} Known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
