"""Local-learning methods. Importing this package registers e2e, dgl, infopro and glcan; add-ons (man, lam, pff,
cascade) compose with the bases through ``method.addons``."""

from . import dgl, e2e, glcan, infopro  # noqa: F401  (registration)
from .base import LocalMethod, build_method, list_methods, method_class, register_method
from .objective import LocalLoss, Objective
from .options import ADDON_PRESETS, ADDONS, MethodCfg, MethodContext

__all__ = [
    "ADDONS",
    "ADDON_PRESETS",
    "LocalLoss",
    "LocalMethod",
    "MethodCfg",
    "MethodContext",
    "Objective",
    "build_method",
    "list_methods",
    "method_class",
    "register_method",
]
