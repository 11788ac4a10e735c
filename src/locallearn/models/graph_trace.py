"""Two ways to turn a model's forward into one graph that :mod:`.graph_cut` cuts (docs/api.md, "How capture works").

:func:`trace_export` (the default) runs the forward once with fake tensors through ``torch.export`` (non-strict,
the batch dimension dynamic): Python control flow on shapes, iteration over tensors, ``torch.rand(x.shape[0], ...)``
in a drop path and a hub model's config logic all just run, and the graph records ATen ops. On this torch the
exported program keeps the model's own ``Parameter`` and buffer objects (``ep.module()`` reads them by attribute,
and BatchNorm updates its running statistics in place in the user's buffers), so the units train the original
model and its ``state_dict`` stays the original's. :func:`trace_fx` (symbolic tracing) is kept for one thing
export cannot do: treat a submodule as opaque (``leaf_modules``), which is the way past data-dependent control
flow. Both record what every submodule call returns (the candidate cuts) and each tensor node's shape.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import optimization_hint

from .graph_cut import ROOT, CaptureError, readable


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


def first_line(error: BaseException) -> str:
    """The first line of an error's message (at most 200 characters), or its type's name."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def where_failed(error: BaseException, model: nn.Module) -> tuple[str | None, str]:
    """The submodule of :func:`failure_site` and `` at name (file.py:line: source)`` for a message ("" if none)."""
    name, line = failure_site(error, model)
    return name, f" at {name or 'its own forward'} ({line})" if line else ""


def _failed(tool: str, model: nn.Module, error: Exception, fallback: str) -> CaptureError:
    """One line: which tool failed, at which submodule and source line, why, and the way out."""
    first = first_line(error)
    name, where = where_failed(error, model)
    target = repr(name) if name else "the submodule with data-dependent control flow"
    shown = name or "NAME"
    return CaptureError(
        f"{tool} cannot capture {type(model).__name__}.forward{where} ({type(error).__name__}: {first}); mark "
        f"{target} as opaque with leaf_modules=[{shown!r}] (CLI: model.leaf_modules=[{shown}]){fallback}, or wrap "
        "your layers with UnitBackbone.from_sequential"
    )


def trace_export(wrapper: nn.Module, example: torch.Tensor, training: bool) -> tuple[fx.GraphModule, dict]:
    """``wrapper`` (the user's model at ``wrapper.model``) exported in ``training`` mode, with its calls table."""
    wrapper.train(training)
    batch = torch.export.Dim.AUTO
    try:
        with torch.random.fork_rng(devices=[]), _quiet_torch_warnings():  # (fake tensors draw nothing anyway)
            program = torch.export.export(wrapper, (example,), dynamic_shapes=({0: batch},), strict=False)
    except CaptureError:
        raise
    except Exception as e:
        raise _failed("torch.export", wrapper.model, e, ": capture then traces with torch.fx") from None
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not node.users:  # the input guard export adds; the units check nothing
            gm.graph.erase_node(node)
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        node.meta["shape"] = tuple(optimization_hint(s) for s in val.shape) if isinstance(val, torch.Tensor) else None
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    if not isinstance(x.meta["val"].shape[0], torch.SymInt):
        raise CaptureError(
            f"{type(wrapper.model).__name__}.forward only works for a batch of {example.shape[0]} (torch.export had to "
            "fix the batch size): read the batch size from the input (x.shape[0]) instead of a constant"
        )
    return gm, _calls_of_export(gm)


@contextlib.contextmanager
def _quiet_torch_warnings() -> Iterator[None]:
    """torch's own warnings while exporting (a failed export prints its partial graph to stderr): the one-line
    CaptureError says what failed and where, so nothing else reaches the user's terminal."""
    loggers = [logging.getLogger(name) for name in ("torch.fx.experimental.symbolic_shapes", "torch.export")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _calls_of_export(gm: fx.GraphModule) -> dict[str, list[fx.Node | None]]:
    """Per submodule, per call, the one tensor its ops hand to the rest of the graph (None when not exactly one),
    read from each node's ``nn_module_stack`` (which module calls, outermost first, the op ran inside)."""
    members: dict[str, dict[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
                members.setdefault(path.partition("@")[0], {}).setdefault(key, []).append(node)
    calls = {}
    for path, by_call in members.items():
        outs = []
        for nodes in by_call.values():
            inside = set(nodes)
            leaving = [n for n in nodes if n.meta["shape"] is not None and any(u not in inside for u in n.users)]
            outs.append(leaving[0] if len(leaving) == 1 else None)
        calls[path] = outs
    return calls


class _Tracer(fx.Tracer):
    """fx's tracer, recording what every submodule call returns (the candidate cuts)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.calls: dict[str, list[fx.Node | None]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        out = super().call_module(m, forward, args, kwargs)
        self.calls.setdefault(name, []).append(out.node if isinstance(out, fx.Proxy) else None)
        return out


def trace_fx(
    wrapper: nn.Module, example: torch.Tensor, training: bool, leaf_modules: tuple[str, ...] = ()
) -> tuple[fx.GraphModule, dict]:
    """``wrapper`` traced symbolically in ``training`` mode, ``leaf_modules`` kept opaque, with its calls table.
    A forward that reads ``self.training`` in Python is baked into the trace, hence one trace per mode."""
    tracer = _Tracer({f"{ROOT}.{name}" for name in leaf_modules})
    wrapper.train(training)
    try:
        graph = tracer.trace(wrapper)
    except CaptureError:
        raise
    except Exception as e:  # fx's TraceError, or whatever the model's forward raised on proxies
        raise _failed("torch.fx", wrapper.model, e, ": it then stays inside one unit") from None
    gm = fx.GraphModule(wrapper, graph)
    wrapper.eval()
    _shape_pass(gm, example)
    return gm, tracer.calls


class _ShapePass(fx.Interpreter):
    """Runs the graph once, recording each tensor-valued node's shape in ``node.meta["shape"]``; a failing op
    becomes one CaptureError naming it and the input's shape."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            first = first_line(e)
            self.failure = (
                f"the model fails on an example input of shape {list(self.example_shape)} at {readable(n)} ({first}); "
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
