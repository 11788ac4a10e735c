"""Model registry: ``@register_model("name")`` on a builder, ``create_model(name, **kw)`` to build (timm style).

Builders return a :class:`~locallearn.models.units.UnitBackbone`: an ordered list of units that local learning
cuts into modules. No ``exec``/``eval``: names map to functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..names import unknown_name
from .hub import hub_builder
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
        raise ValueError(unknown_name("model", name, _MODELS))
    return _MODELS[name](**kwargs)


def is_import_path(name: str) -> bool:
    """``package.module:function``: the user's own model builder rather than a registered name."""
    return ":" in name


def import_builder(path: str) -> Callable[..., Any]:
    """The function named by ``package.module:function``, imported explicitly with importlib (never ``eval``);
    ``transformers:<Class>`` builds a hub model from its config (:mod:`.hub`)."""
    hub = hub_builder(path)
    if hub is not None:
        return hub
    module_name, _, attr = path.partition(":")
    if (
        not module_name
        or not attr
        or not all(part.isidentifier() for part in [*module_name.split("."), *attr.split(".")])
    ):
        raise ValueError(f"model.name={path!r} must look like package.module:function, e.g. mynets.unet:build_unet")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"model.name={path}: cannot import {module_name!r} ({e}); install it or put its folder on PYTHONPATH"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model.name={path}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model.name={path}: {attr!r} is not callable; name a function or class that builds the model")
    return obj
