"""Per-unit and per-module costs: parameters, FLOPs (``torch.utils.flop_counter``) and saved-activation bytes.

Used to balance automatic splits (``split.balance``) and by ``locallearn summary``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_map_only
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
            with meter:  # x may be a captured model's carry (a tuple of tensors): each becomes a leaf
                y = unit(tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.is_floating_point()), x))
            costs.append(float(meter.peak))
            x = tree_map_only(torch.Tensor, torch.Tensor.detach, y)
    return costs


def train_flops(fn, *args) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``loss = fn(*args); loss.backward()``.

    :class:`FlopCounterMode` attributes every op to the phase it runs in, so the split is exact: a conv's backward
    is 2× its forward when its input needs a gradient (grad input + grad weight), 1× when it does not (the first
    conv of a model, or of a local module whose input is detached). Gradients accumulate into ``.grad`` as usual.
    """
    with FlopCounterMode(display=False) as counter:
        loss = fn(*args)
    forward = int(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return forward, int(counter.get_total_flops())
