"""Models of the Hugging Face model hub, built from a config and never downloaded (docs/api.md, "Hub models").

``model.name=transformers:ViTForImageClassification`` with ``model.kwargs`` as the fields of the class's own
config (``hidden_size``, ``num_hidden_layers``, ...) builds the model with fresh weights, the dataset's class count
as ``num_labels`` (a causal language model's: ``vocab_size``) and its channels as ``num_channels`` unless the
kwargs say otherwise; the run then captures it like any model of yours (:meth:`UnitBackbone.from_module`). A
misspelt config field is refused: a transformers config would keep it silently as an attribute nobody reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ..names import did_you_mean

PREFIX = "transformers"


def transformers_model(
    name: str, num_classes: int | None = None, in_channels: int | None = None, **config: Any
) -> nn.Module:
    """``transformers.<name>`` built from ``<name>.config_class(**config)`` (see the module doc)."""
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"model.name={PREFIX}:{name} needs the transformers package: pip install 'locallearn[hub]'"
        ) from None
    cls = getattr(transformers, name, None)
    if cls is None or not isinstance(getattr(cls, "config_class", None), type):
        models = [n for n in dir(transformers) if n.endswith(("Model", "ForImageClassification", "ForCausalLM"))]
        raise ValueError(f"transformers has no model class {name!r}{did_you_mean(name, models)}")
    defaults = cls.config_class()
    unknown = [key for key in config if not hasattr(defaults, key)]
    if unknown:
        fields = list(defaults.to_dict())
        raise ValueError(
            f"{name}: {cls.config_class.__name__} has no field {unknown[0]!r}{did_you_mean(unknown[0], fields)}; "
            "model.kwargs are the fields of the model's config"
        )
    causal_lm = name.endswith(("LMHeadModel", "ForCausalLM"))  # the dataset's classes are its vocabulary
    given = {"vocab_size" if causal_lm else "num_labels": num_classes, "num_channels": in_channels}
    config |= {k: v for k, v in given.items() if v is not None and k not in config and hasattr(defaults, k)}
    return cls(cls.config_class(**config))


def hub_builder(path: str) -> Callable[..., nn.Module] | None:
    """The builder for ``transformers:<Class>`` (None for any other ``package.module:function``)."""
    module, _, name = path.partition(":")
    return functools.partial(transformers_model, name) if module == PREFIX else None
