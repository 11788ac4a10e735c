"""Your own ``nn.Module`` as units: capture its forward as one graph and cut it after named submodules.

How (measured, docs/api.md "How capture works"): ``torch.export`` (non-strict, batch dimension dynamic) by default,
because it takes what research code and hub models do in Python (shape logic, iterating tensors, drop path's
``torch.rand(x.shape[0], ...)``), which symbolic tracing refuses; on this torch its graph reads the model's own
parameters and buffers, so the units train the original model and BatchNorm moves the user's running statistics.
``torch.fx`` traces instead when ``leaf_modules`` names submodules to keep opaque, the way past data-dependent
control flow (:mod:`.graph_trace`). A forward that depends on the mode (dropout, BatchNorm, stochastic depth) is
captured once per mode and each unit keeps both graphs when they differ.

A *cut* after submodule ``name`` is the value its call returns: the cut's **main tensor**, where the aux net
attaches. Every other value computed before the cut and read after it (skip connections, class tokens, masks)
is carried with it as a tuple ``(main, *others)``; a unit whose carry is just the main tensor passes a plain
tensor, so a chain model behaves exactly as a zoo backbone. The engine detaches every tensor of a carry at a
module boundary, which keeps gradient isolation for skips too (:mod:`.graph_cut`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .graph_cut import (
    CaptureError,
    auto_cuts,
    cut_table,
    drop_empty,
    is_block_of,
    output_node,
    outside_blocks,
    partition,
    readable,
    resolve,
    tensor_shape,
)
from .graph_trace import first_line, trace_export, trace_fx, where_failed

__all__ = ["CaptureError", "Captured", "CapturedUnit", "capture", "pick_output"]


def pick_output(out: Any, output: str | int | None = None) -> Any:
    """The prediction among a model's outputs: ``output`` (a key, attribute or index), else ``.logits`` / the
    ``"logits"`` key, else the first tensor of a tuple, list, dict or dataclass."""
    if output is not None:
        try:
            return out[output] if isinstance(out, (dict, list, tuple)) else getattr(out, output)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise CaptureError(
                f"output={output!r} is not in the model's output ({type(out).__name__}); name a key, attribute or "
                "index of what forward returns"
            ) from None
    if isinstance(out, (fx.Proxy, torch.Tensor)):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is not None:
        return logits
    if dataclasses.is_dataclass(out):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    for item in out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ():
        found = pick_output(item) if isinstance(item, (list, tuple, dict)) else item
        if isinstance(found, (fx.Proxy, torch.Tensor)):
            return found
    raise CaptureError(f"the model returns {type(out).__name__} with no tensor in it; pass output=<key or index>")


class PickedOutput(nn.Module):
    """The model with its prediction picked from what forward returns (:func:`pick_output`): what both tracers take."""

    def __init__(self, model: nn.Module, output: str | int | None) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> Any:
        return pick_output(self.model(x), self.output)


@dataclasses.dataclass
class Captured:
    """What :func:`capture` hands to ``UnitBackbone.from_module``: the units, each unit's main output shape,
    the cut names (``names[i]``: the submodule names whose output ends unit i, shortest first) and the planned
    module ends of ``cuts`` (None without cuts)."""

    units: list[nn.Module]
    shapes: list[tuple[int, ...]]
    names: list[list[str]]
    planned_ends: list[int] | None
    carried: list[list[str]]  # per cut, the values carried besides the main tensor (graph node names)
    untensored: list[list[str]]  # per cut, those carried values that are not tensors (sizes)


class CapturedUnit(nn.Module):
    """One piece of the captured graph: ``carry -> carry`` (the last: ``carry -> prediction``). ``eval_graph`` is
    the eval-mode trace where it differs from the training one."""

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule | None) -> None:
        super().__init__()
        self.train_graph, self.eval_graph = train_graph, eval_graph

    def forward(self, carry: Any) -> Any:
        graph = self.train_graph if self.training or self.eval_graph is None else self.eval_graph
        return graph(carry)


def capture(
    model: nn.Module,
    example: torch.Tensor,
    cuts: Sequence[str] | None = None,
    output: str | int | None = None,
    leaf_modules: Sequence[str] = (),
) -> Captured:
    """Capture ``model`` (train and eval mode), cut it after ``cuts`` (plus the automatic candidate cuts between
    them, so split-time balancing and add-ons that copy the next unit have blocks to work with) and return the
    units. ``leaf_modules``: submodule names kept opaque (never traced into, so never cut inside; torch.fx)."""
    wrapper = PickedOutput(model, output)
    names = dict(model.named_modules())
    missing = [n for n in leaf_modules if n not in names]
    if missing:
        raise CaptureError(f"leaf_modules: the model has no submodule {missing[0]!r}; use names from named_modules()")
    if example.shape[0] < 2:  # (export would fix a batch of 1 as a constant)
        example = torch.cat([example, example])
    trace = functools.partial(trace_fx, leaf_modules=tuple(leaf_modules)) if leaf_modules else trace_export
    with _modes_kept(model):  # tracing switches modes; the user's model ends as it was
        _run_once(wrapper, example)
        graphs = {mode: trace(wrapper, example, mode) for mode in (True, False)}
    gm, calls = graphs[True]
    pred = output_node(gm)
    if not isinstance(pred, fx.Node) or tensor_shape(pred) is None:
        raise CaptureError("the picked prediction is not a tensor; pass output=<key or index of a tensor>")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = order[pred]
    table = cut_table(calls)
    user = list(cuts or [])
    user_bounds = resolve(table, user, order, last, auto=False)
    candidates = outside_blocks(auto_cuts(table, is_block_of(model, set(leaf_modules)), order, last), table, gm)
    auto_bounds = resolve(table, candidates, order, last, auto=True)
    merged: dict[fx.Node, list[str]] = {}  # one cut per value; the user's name for it first
    for node, aliases in [*user_bounds.items(), *auto_bounds.items()]:
        merged.setdefault(node, []).extend(a for a in aliases if a not in merged[node])
    bounds = drop_empty(dict(sorted(merged.items(), key=lambda item: order[item[0]])), set(user_bounds), gm, order)
    nodes = list(bounds)
    train_units, carries = partition(gm, nodes, pred)
    eval_units = _eval_units(*graphs[False], bounds, len(nodes), gm)
    units = [CapturedUnit(t, e) for t, e in zip(train_units, eval_units)]
    shapes = [tensor_shape(n) for n in nodes] + [tensor_shape(pred)]
    cut_names = [bounds[n] for n in nodes] + [["output"]]
    planned = [*sorted(nodes.index(n) + 1 for n in user_bounds), len(units)] if user else None
    carried = [[readable(v) for v in carry[1:]] for carry in carries]
    untensored = [[readable(v) for v in carry[1:] if tensor_shape(v) is None] for carry in carries]
    return Captured(units, shapes, cut_names, planned, carried, untensored)


def _run_once(wrapper: nn.Module, example: torch.Tensor) -> None:
    """One eval-mode forward on the example (no_grad, forked RNG: the user's statistics and random streams stay
    untouched), so that a model that does not take this input says so before any tracing does."""
    wrapper.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            wrapper(example)
        except CaptureError:
            raise
        except Exception as e:
            _, where = where_failed(e, wrapper.model)
            raise CaptureError(
                f"the model fails on an example input of shape {list(example.shape)}{where} ({first_line(e)}); does "
                "it take this dataset's inputs (channels, size, model.kwargs)?"
            ) from None


@contextlib.contextmanager
def _modes_kept(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _eval_units(
    gm: fx.GraphModule, calls: dict, train_bounds: dict, count: int, train_gm: fx.GraphModule
) -> list[fx.GraphModule | None]:
    """The eval-mode trace cut at the same names, or Nones when it is the same graph as the training one."""
    if gm.code == train_gm.code:
        return [None] * (count + 1)
    table = cut_table(calls)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pred = output_node(gm)
    bounds = []
    for names in train_bounds.values():
        entry = table.get(names[0])
        if entry is None or entry[2]:
            raise CaptureError(
                f"cut {names[0]!r} exists in the training-mode graph but not in the eval-mode one (forward branches "
                "on self.training around it); cut elsewhere"
            )
        bounds.append(entry[1])
    if [order[b] for b in bounds] != sorted(order[b] for b in bounds):
        raise CaptureError("the eval-mode graph runs the cuts in another order than the training one; cut elsewhere")
    return partition(gm, bounds, pred)[0]
