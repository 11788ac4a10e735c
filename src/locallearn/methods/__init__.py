"""Local-learning methods. Importing this package registers e2e, dgl and infopro."""

from . import dgl, e2e, infopro  # noqa: F401  (registration)
from .base import (
    LocalMethod,
    MethodCfg,
    MethodContext,
    build_method,
    list_methods,
    method_class,
    register_method,
    resolve_k,
)

__all__ = [
    "LocalMethod",
    "MethodCfg",
    "MethodContext",
    "build_method",
    "list_methods",
    "method_class",
    "register_method",
    "resolve_k",
]
