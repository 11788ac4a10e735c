"""End-to-end backprop: one module, the task loss only. The baseline every local method is compared with."""

from __future__ import annotations

from .base import LocalMethod, register_method
from .options import MethodCfg, MethodContext


@register_method("e2e")
class E2E(LocalMethod):
    default_k = 1

    def __init__(self, ctx: MethodContext, cfg: MethodCfg) -> None:
        if ctx.num_modules != 1:
            raise ValueError(f"e2e trains the whole network as one module; set split.k=1 (got {ctx.num_modules})")
        if cfg.addons:
            raise ValueError("e2e has no aux nets, so method.addons must be empty")
        super().__init__(ctx, cfg)
