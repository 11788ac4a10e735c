"""Your own ``nn.Module`` as units: capture its forward with torch.fx and cut it after named submodules.

Why torch.fx rather than torch.export: an fx graph *calls the user's own submodule objects* and reads their
parameters by attribute, so the units train the very tensors of the original model; its ``state_dict`` keys,
BatchNorm buffers, ``train()``/``eval()`` and parameter sharing are the original's by construction. torch.export
returns a functional ATen graph with the parameters lifted to inputs and BatchNorm updates returned as extra
outputs: a copy of the model that would have to be synchronised back after every step. A model that fx cannot
trace (data-dependent control flow) export cannot take either without rewriting it. A forward that reads
``self.training`` in Python (``F.dropout(x, p, self.training)``, stochastic depth) is baked into its trace, so the
model is traced once per mode and each unit keeps both graphs when they differ.

A *cut* after submodule ``name`` is the value its call returns: the cut's **main tensor**, where the aux net
attaches. Every other value computed before the cut and read after it (skip connections, class tokens, masks,
sizes) is carried with it as a tuple ``(main, *others)``; a unit whose carry is just the main tensor passes a
plain tensor, so a chain model behaves exactly as a zoo backbone. The engine detaches every tensor of a carry at
a module boundary, which keeps gradient isolation for skips too.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import linecache
import operator
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..names import did_you_mean

ROOT = "model"  # the user's model inside the tracing wrapper; names given to users are relative to it


class CaptureError(ValueError):
    """The model cannot be captured or cut as asked; the message names the problem and the way out."""


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


class _Picked(nn.Module):
    def __init__(self, model: nn.Module, output: str | int | None) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> Any:
        return pick_output(self.model(x), self.output)


class _Tracer(fx.Tracer):
    """fx's tracer, recording what every submodule call returns (the candidate cuts) and whether it is a leaf."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.calls: dict[str, list[Any]] = {}
        self.leaf_calls: set[str] = set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        out = super().call_module(m, forward, args, kwargs)
        self.calls.setdefault(name, []).append(out)
        if self.is_leaf_module(m, name):
            self.leaf_calls.add(name)
        return out


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


def _trace(wrapper: _Picked, leaves: set[str], training: bool) -> tuple[fx.GraphModule, _Tracer]:
    tracer = _Tracer(leaves)
    wrapper.train(training)
    try:
        graph = tracer.trace(wrapper)
    except CaptureError:
        raise
    except Exception as e:  # fx's TraceError, or whatever the model's forward raised on proxies
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        name, line = failure_site(e, wrapper.model)
        where = f" at {name or 'its own forward'} ({line})" if line else ""
        fix = (
            f"mark {name!r} as opaque with leaf_modules=[{name!r}] (CLI: model.leaf_modules=[{name}]); it then stays "
            "inside one unit"
            if name
            else "mark the submodule with data-dependent control flow as opaque with leaf_modules=[name] (CLI: "
            "model.leaf_modules=[name]); it then stays inside one unit"
        )
        raise CaptureError(
            f"torch.fx cannot capture {type(wrapper.model).__name__}.forward{where} ({type(e).__name__}: {first}); "
            f"{fix}, or wrap your layers with UnitBackbone.from_sequential"
        ) from None
    return fx.GraphModule(wrapper, graph), tracer


def failure_site(error: BaseException, model: nn.Module) -> tuple[str | None, str | None]:
    """Where tracing failed, as the user reads it: the innermost submodule of ``model`` on the traceback (its
    name from ``named_modules()``, "" for the model itself) and ``file.py:line: source`` of that frame."""
    names = {id(module): name for name, module in model.named_modules()}
    found: tuple[str | None, str | None] = (None, None)
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            file = tb.tb_frame.f_code.co_filename
            source = linecache.getline(file, tb.tb_lineno).strip()
            found = (names[id(owner)], f"{Path(file).name}:{tb.tb_lineno}: {source}")
        tb = tb.tb_next
    return found


class _ShapePass(fx.Interpreter):
    """Runs the graph once, recording each tensor-valued node's shape in ``node.meta["shape"]``; a failing op
    becomes one CaptureError naming it and the input's shape."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.failure = (
                f"the model fails on an example input of shape {list(self.example_shape)} at {_readable(n)} ({first}); "
                "does it take this dataset's images (channels, size, model.kwargs)?"
            )
            raise
        n.meta["shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        return result


def _shape_pass(gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Record every node's output shape with one eval-mode forward, under no_grad and a forked RNG, so the user's
    BatchNorm statistics and random streams stay untouched (meta tensors work: the estimator captures on meta)."""
    interpreter = _ShapePass(gm)
    interpreter.example_shape, interpreter.failure = tuple(x.shape), ""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            interpreter.run(x)
        except Exception:
            if interpreter.failure:  # (fx appends the failing graph to the exception's text: leave it out)
                raise CaptureError(interpreter.failure) from None
            raise


def _readable(node: fx.Node) -> str:
    """A node's name as the user reads it: ``enc1_5`` (the 6th op of enc1), not ``model_enc1_5``."""
    return node.name.removeprefix(ROOT + "_")


def _tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("shape")


def _has_params(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return any(True for _ in root.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        return isinstance(operator.attrgetter(node.target)(root), nn.Parameter)
    return False


def _cut_table(tracer: _Tracer) -> dict[str, tuple[int, fx.Node | None, str]]:
    """Every submodule name → (times called, the node its single call returns or None, why it cannot be a cut)."""
    table = {}
    for name, outs in tracer.calls.items():
        if name == ROOT:
            continue
        node = outs[0].node if len(outs) == 1 and isinstance(outs[0], fx.Proxy) else None
        why = ""
        if len(outs) > 1:
            why = f"it runs {len(outs)} times in forward (a loop or a shared module)"
        elif node is None or _tensor_shape(node) is None:
            why = "it does not return one tensor"
        table[name.removeprefix(ROOT + ".")] = (len(outs), node, why)
    return table


def _auto_cuts(table: dict, tracer: _Tracer, order: dict[fx.Node, int], last: int) -> list[str]:
    """Candidate cuts when the user names none: blocks, i.e. non-leaf submodules at depth 1 or 2 (``layer1``,
    ``layer1.0``, ``encoder.2``) that run once and return a (B, C, H, W) map or (B, N, C) tokens; plain layers
    (a Conv2d, a BatchNorm) when the model has no blocks."""

    def ok(name: str, leaf_ok: bool) -> bool:
        _, node, why = table[name]
        is_leaf = f"{ROOT}.{name}" in tracer.leaf_calls
        return (
            not why
            and name.count(".") <= 1
            and (leaf_ok or not is_leaf)
            and len(_tensor_shape(node)) in (3, 4)
            and order[node] < last
        )

    blocks = [n for n in table if ok(n, leaf_ok=False)]
    return blocks or [n for n in table if ok(n, leaf_ok=True)]


def _resolve(
    table: dict, names: Sequence[str], order: dict[fx.Node, int], last: int, auto: bool
) -> dict[fx.Node, list[str]]:
    """Cut names → boundary nodes (names returning the same value share one cut), refusing bad names."""
    bounds: dict[fx.Node, list[str]] = {}
    for name in names:
        if name not in table:
            raise CaptureError(
                f"cut {name!r}: the model has no submodule of that name that runs in forward"
                f"{did_you_mean(name, table)}; "
                "use fully qualified names as in model.named_modules(), e.g. 'layer1' or 'layer2.3'"
            )
        _, node, why = table[name]
        if why:
            raise CaptureError(
                f"cannot cut after {name!r}: {why}; cut after a module that runs once and returns a tensor"
            )
        shape = _tensor_shape(node)
        if order[node] >= last:
            raise CaptureError(f"cannot cut after {name!r}: nothing of the model runs after it; cut earlier")
        if len(shape) not in (3, 4):
            raise CaptureError(
                f"cannot cut after {name!r}: its output has shape {list(shape)}, and aux nets need a (B, C, H, W) map "
                "or (B, N, C) tokens; cut after an earlier submodule"
            )
        if not auto and node in bounds:
            raise CaptureError(
                f"cuts {bounds[node][0]!r} and {name!r} are the same point (one returns the other's output)"
            )
        bounds.setdefault(node, []).append(name)
    return {node: sorted(ns, key=lambda n: (n.count("."), len(n))) for node, ns in bounds.items()}


def _partition(
    gm: fx.GraphModule, bounds: list[fx.Node], pred: fx.Node
) -> tuple[list[fx.GraphModule], list[list[fx.Node]]]:
    """Cut ``gm``'s graph after each boundary node (graph order). Returns one GraphModule per unit and, per cut,
    the values carried across it (the boundary first). Parameters read by attribute (``get_attr``) are read
    again in every unit that uses them, never carried: a carried parameter would be detached at the cut."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    cut_at = [order[b] for b in bounds]

    def unit_of(n: fx.Node) -> int:
        return len(bounds) if n.op == "output" else bisect.bisect_left(cut_at, order[n])

    carries: list[list[fx.Node]] = []
    for c, bound in enumerate(bounds):
        crossing = [
            n
            for n in nodes
            if n.op not in ("get_attr", "output") and unit_of(n) <= c and any(unit_of(u) > c for u in n.users)
        ]
        carries.append([bound, *(n for n in crossing if n is not bound)])

    units = []
    for u in range(len(bounds) + 1):
        graph, env = fx.Graph(), {}

        def lookup(a: fx.Node, graph: fx.Graph = graph, env: dict = env) -> fx.Node:
            if a not in env and a.op == "get_attr":
                env[a] = graph.get_attr(a.target)
            return env[a]

        if u == 0:
            for n in nodes:
                if n.op == "placeholder":
                    env[n] = graph.placeholder(n.name)
        else:
            carry = graph.placeholder("carry")
            inputs = carries[u - 1]
            for i, v in enumerate(inputs):
                env[v] = carry if len(inputs) == 1 else graph.call_function(operator.getitem, (carry, i))
        for n in nodes:
            if n.op not in ("placeholder", "get_attr", "output") and unit_of(n) == u:
                env[n] = graph.node_copy(n, lookup)
        if u == len(bounds):
            graph.output(fx.map_arg(pred, lookup))
        else:
            outs = [lookup(v) for v in carries[u]]
            graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        graph.lint()
        units.append(fx.GraphModule(gm, graph, class_name=f"Unit{u}"))
    return units, carries


def capture(
    model: nn.Module,
    example: torch.Tensor,
    cuts: Sequence[str] | None = None,
    output: str | int | None = None,
    leaf_modules: Sequence[str] = (),
) -> Captured:
    """Trace ``model`` (train and eval mode), cut it after ``cuts`` (plus the automatic candidate cuts between
    them, so split-time balancing and add-ons that copy the next unit have blocks to work with) and return the
    units. ``leaf_modules``: submodule names kept opaque (never traced into, so never cut inside)."""
    wrapper = _Picked(model, output)
    names = dict(model.named_modules())
    missing = [n for n in leaf_modules if n not in names]
    if missing:
        raise CaptureError(f"leaf_modules: the model has no submodule {missing[0]!r}; use names from named_modules()")
    leaves = {f"{ROOT}.{name}" for name in leaf_modules}
    with _modes_kept(model):  # tracing and the shape pass switch modes; the user's model ends as it was
        graphs = {mode: _trace(wrapper, leaves, mode) for mode in (True, False)}
        wrapper.eval()
        for g, _ in graphs.values():
            _shape_pass(g, example)
    gm, tracer = graphs[True]
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    pred = outputs[0].args[0]
    if not isinstance(pred, fx.Node) or _tensor_shape(pred) is None:
        raise CaptureError("the picked prediction is not a tensor; pass output=<key or index of a tensor>")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = order[pred]
    table = _cut_table(tracer)
    user = list(cuts or [])
    user_bounds = _resolve(table, user, order, last, auto=False)
    auto_bounds = _resolve(table, _auto_cuts(table, tracer, order, last), order, last, auto=True)
    merged: dict[fx.Node, list[str]] = {}  # one cut per value; the user's name for it first
    for node, aliases in [*user_bounds.items(), *auto_bounds.items()]:
        merged.setdefault(node, []).extend(a for a in aliases if a not in merged[node])
    bounds = _drop_empty(dict(sorted(merged.items(), key=lambda item: order[item[0]])), set(user_bounds), gm, order)
    nodes = list(bounds)
    train_units, carries = _partition(gm, nodes, pred)
    eval_units = _eval_units(*graphs[False], bounds, len(nodes), gm)
    units = [CapturedUnit(t, e) for t, e in zip(train_units, eval_units)]
    shapes = [_tensor_shape(n) for n in nodes] + [_tensor_shape(pred)]
    cut_names = [bounds[n] for n in nodes] + [["output"]]
    planned = [*sorted(nodes.index(n) + 1 for n in user_bounds), len(units)] if user else None
    carried = [[_readable(v) for v in carry[1:]] for carry in carries]
    untensored = [[_readable(v) for v in carry[1:] if _tensor_shape(v) is None] for carry in carries]
    return Captured(units, shapes, cut_names, planned, carried, untensored)


@contextlib.contextmanager
def _modes_kept(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _drop_empty(bounds: dict, keep: set, gm: fx.GraphModule, order: dict) -> dict:
    """Drop automatic cuts that would leave a unit without parameters (its ops merge into the next unit); the
    user's own cuts stay (the engine refuses a *module* without parameters, naming the cut)."""
    params_at = sorted(order[n] for n in gm.graph.nodes if _has_params(n, gm))

    def any_params(after: int, upto: int) -> bool:  # a parameter node with after < position <= upto
        return bisect.bisect_right(params_at, after) < bisect.bisect_right(params_at, upto)

    kept: dict = {}
    prev = -1
    for node, names in bounds.items():
        if node in keep or any_params(prev, order[node]):
            kept[node], prev = names, order[node]
    while kept:  # the last unit needs parameters too
        node = next(reversed(kept))
        if node in keep or any_params(order[node], len(order)):
            break
        del kept[node]
    return kept


def _eval_units(
    gm: fx.GraphModule, tracer: _Tracer, train_bounds: dict, count: int, train_gm: fx.GraphModule
) -> list[fx.GraphModule | None]:
    """The eval-mode trace cut at the same names, or Nones when it is the same graph as the training one."""
    if gm.code == train_gm.code:
        return [None] * (count + 1)
    table = _cut_table(tracer)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pred = next(n for n in gm.graph.nodes if n.op == "output").args[0]
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
    return _partition(gm, bounds, pred)[0]
