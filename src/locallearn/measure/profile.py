"""Per-unit and per-module costs: parameters, FLOPs (``torch.utils.flop_counter``) and saved-activation bytes.

Used to balance automatic splits (``method.balance``) and by ``locallearn summary``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .memory import SavedTensorMeter


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def forward_flops(fn, *args) -> int:
    """Forward FLOPs of ``fn(*args)`` (no gradient recorded)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


def unit_costs(units: list[nn.Module], sample: torch.Tensor, by: str) -> list[float]:
    """Cost of each unit when fed ``sample`` through the preceding ones: ``units``/``params``/``flops``/
    ``activations`` (bytes autograd saves for backward in a training-mode forward)."""
    if by == "units":
        return [1.0] * len(units)
    if by == "params":
        return [float(count_params(u)) for u in units]
    if by not in ("flops", "activations"):
        raise ValueError(f"unknown balance {by!r}; choose units, params, flops or activations")
    costs, x = [], sample
    units = copy.deepcopy(units)  # a training-mode forward updates BN statistics: never touch the real model
    for unit in units:
        unit.train()
        if by == "flops":
            costs.append(float(forward_flops(unit, x)))
            with torch.no_grad():
                x = unit(x)
        else:
            meter = SavedTensorMeter()
            with meter:
                y = unit(x.detach().requires_grad_(x.is_floating_point()))
            costs.append(float(meter.peak))
            x = y.detach()
    return costs
