"""Cutting a captured forward graph into units (docs/api.md, "Any nn.Module: from_module").

Works on any torch.fx graph whose nodes carry ``meta["shape"]`` (a tensor's shape, else None), whichever tracer
made it (:mod:`.graph_trace`): the cut table says which submodule calls return one tensor, :func:`partition`
splits the graph after the chosen ones. A value computed before a cut and read after it is carried across the
cut, except a *size* (a symbolic integer of an exported graph, such as the batch size): it is read again from a
carried tensor of the same size, so only tensors cross a cut wherever that is possible.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..names import did_you_mean

ROOT = "model"  # the user's model inside the tracing wrapper; names given to users are relative to it
SIZE_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


class CaptureError(ValueError):
    """The model cannot be captured or cut as asked; the message names the problem and the way out."""


def readable(node: fx.Node) -> str:
    """A node's name as the user reads it: ``enc1_5`` (the 6th op of enc1), not ``model_enc1_5``."""
    return node.name.removeprefix(ROOT + "_")


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("shape")


def is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), SIZE_TYPES)


def has_params(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return any(True for _ in root.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        return isinstance(operator.attrgetter(node.target)(root), nn.Parameter)
    return False


def cut_table(calls: dict[str, list[fx.Node | None]]) -> dict[str, tuple[int, fx.Node | None, str]]:
    """Every submodule name → (times called, the node its single call returns or None, why it cannot be a cut).
    ``calls``: per submodule (``model.``-prefixed), per call, the one tensor node it returned (None otherwise)."""
    table = {}
    for name, outs in calls.items():
        if name in ("", ROOT):  # the tracing wrapper and the model itself
            continue
        node = outs[0] if len(outs) == 1 else None
        why = ""
        if len(outs) > 1:
            why = f"it runs {len(outs)} times in forward (a loop or a shared module)"
        elif node is None or tensor_shape(node) is None:
            why = "it does not return one tensor"
        table[name.removeprefix(ROOT + ".")] = (len(outs), node, why)
    return table


def auto_cuts(table: dict, is_block: Callable[[str], bool], order: dict[fx.Node, int], last: int) -> list[str]:
    """Candidate cuts when the user names none: blocks (``is_block``: ``layer1``, ``layer1.0``,
    ``vit.encoder.layer.3``) that run once and return a (B, C, H, W) map or (B, N, C) tokens; plain layers (a
    Conv2d, a BatchNorm) when the model has no blocks."""

    def ok(name: str, blocks_only: bool) -> bool:
        _, node, why = table[name]
        shaped = not why and len(tensor_shape(node)) in (3, 4) and order[node] < last
        return shaped and (is_block(name) or not blocks_only)

    blocks = [n for n in table if ok(n, blocks_only=True)]
    return blocks or [n for n in table if ok(n, blocks_only=False) and n.count(".") <= 1]


def outside_blocks(names: list[str], table: dict, gm: fx.GraphModule) -> list[str]:
    """Automatic candidates minus the cuts inside a block that carry more activations than the block's own end
    (the layers inside a residual block, where a cut would carry the shortcut): balancing cuts between blocks. A
    carried mask (a bool tensor, as a transformer's attention mask) does not count."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    last_read = [(order[n], max(order[u] for u in n.users)) for n in nodes if n.users and _activation(n)]

    def carried(name: str) -> int:
        at = order[table[name][1]]
        return sum(1 for made, read in last_read if made < at < read)

    counts = {name: carried(name) for name in names}
    return [n for n in names if not any(n.startswith(m + ".") and counts[n] > counts[m] for m in names)]


def _activation(node: fx.Node) -> bool:
    """A floating-point tensor computed by the forward (an exported node knows its dtype; an fx node its shape)."""
    if node.op in ("get_attr", "placeholder"):
        return False
    val = node.meta.get("val")
    return val.is_floating_point() if isinstance(val, torch.Tensor) else tensor_shape(node) is not None


def is_block_of(model: nn.Module, opaque: set[str]) -> Callable[[str], bool]:
    """Blocks of ``model``: submodules with submodules of their own (not ``opaque`` ones) at depth 1 or 2, or
    entries of an ``nn.ModuleList`` / ``nn.Sequential`` at any depth (the layers of a hub model)."""
    modules = dict(model.named_modules())

    def is_block(name: str) -> bool:
        module = modules.get(name)
        if module is None or name in opaque or not any(True for _ in module.children()):
            return False
        parent = modules.get(name.rpartition(".")[0])
        return name.count(".") <= 1 or isinstance(parent, (nn.ModuleList, nn.Sequential))

    return is_block


def resolve(
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
        shape = tensor_shape(node)
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


def drop_empty(bounds: dict, keep: set, gm: fx.GraphModule, order: dict) -> dict:
    """Drop automatic cuts that would leave a unit without parameters (its ops merge into the next unit); the
    user's own cuts stay (the engine refuses a *module* without parameters, naming the cut)."""
    # where parameters are used (an exported graph reads them all at its top, so a get_attr counts at its readers)
    params_at = sorted(
        order[u] for n in gm.graph.nodes if has_params(n, gm) for u in (n.users if n.op == "get_attr" else [n])
    )

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


def size_source(node: fx.Node, tensors: Sequence[fx.Node]) -> tuple[fx.Node, int] | bool:
    """How a later unit rebuilds the size ``node`` from the carried ``tensors``: ``(tensor, dim)`` for a read of a
    dimension (any carried tensor with a dimension of the same symbolic size), True for arithmetic on sizes that
    can all be rebuilt, False when it must be carried."""
    if node.op != "call_function" or not is_size(node):
        return False
    if node.target is torch.ops.aten.sym_size.int:
        want = node.meta["val"].node.expr
        for t in tensors:
            val = t.meta.get("val")
            for d, size in enumerate(getattr(val, "shape", ())):
                if isinstance(size, torch.SymInt) and size.node.expr == want:
                    return t, d
        return False
    args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
    return all(is_size(a) and size_source(a, tensors) is not False for a in args)


def partition(
    gm: fx.GraphModule, bounds: list[fx.Node], pred: fx.Node
) -> tuple[list[fx.GraphModule], list[list[fx.Node]]]:
    """Cut ``gm``'s graph after each boundary node (graph order). Returns one GraphModule per unit and, per cut,
    the values carried across it (the boundary first). Parameters read by attribute (``get_attr``) are read
    again in every unit that uses them, never carried: a carried parameter would be detached at the cut. Sizes
    are rebuilt from a carried tensor where :func:`size_source` finds one (module doc)."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    cut_at = [order[b] for b in bounds]

    def unit_of(n: fx.Node) -> int:
        return len(bounds) if n.op == "output" else bisect.bisect_left(cut_at, order[n])

    def crossing(c: int, sizes: bool) -> list[fx.Node]:  # values made up to unit c and read after it
        return [
            n
            for n in nodes
            if n.op not in ("get_attr", "output")
            and is_size(n) == sizes
            and unit_of(n) <= c
            and any(unit_of(u) > c for u in n.users)
        ]

    tensors = [[bound, *(n for n in crossing(c, False) if n is not bound)] for c, bound in enumerate(bounds)]

    def rebuilt(n: fx.Node, c: int) -> bool:  # every later reader can read the size again from its own input
        return all(size_source(n, tensors[unit_of(u) - 1]) is not False for u in n.users if unit_of(u) > c)

    carries = [carry + [n for n in crossing(c, True) if not rebuilt(n, c)] for c, carry in enumerate(tensors)]

    units = []
    for u in range(len(bounds) + 1):
        graph, env = fx.Graph(), {}
        inputs = carries[u - 1] if u else []

        def lookup(a: fx.Node, graph: fx.Graph = graph, env: dict = env, inputs: list = inputs) -> fx.Node:
            if a not in env and a.op == "get_attr":
                env[a] = graph.get_attr(a.target)
            elif a not in env and is_size(a):  # a size read before this unit's input: read it again from the carry
                source = size_source(a, inputs)
                if isinstance(source, tuple):
                    env[a] = graph.call_function(torch.ops.aten.sym_size.int, (env[source[0]], source[1]))
                else:
                    env[a] = graph.node_copy(a, lookup)
                env[a].meta = dict(a.meta)
            return env[a]

        if u == 0:
            for n in nodes:
                if n.op == "placeholder":
                    env[n] = graph.placeholder(n.name)
        else:
            carry = graph.placeholder("carry")
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


def output_node(gm: fx.GraphModule) -> Any:
    """What the graph returns: the prediction node (an exported graph returns it in a one-element tuple)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
