"""The backbone contract: an ordered list of units (docs/methods.md, "The unit contract").

A split groups consecutive units into K gradient-isolated local modules; the model itself knows nothing of
methods or splits. Each unit carries metadata that aux-net builders need at a split point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import CaptureError, capture


@dataclass(frozen=True)
class UnitInfo:
    """What an aux net needs to know about a unit's output.

    Attributes:
        name: readable position, e.g. ``"stem"``, ``"layer2.3"``, ``"head"``.
        channels: output channels (feature width); for the head, the number of outputs.
        stage: 0 for the stem, 1..S for residual stages, S+1 for the head.
        reduction: total spatial downsampling from the input to this unit's output.
        is_head: the task head (its output is the model's prediction).
        tokens: the output is a token sequence (B, N, channels) rather than a (B, C, H, W) map (ViT); aux-net
            builders then use token heads. ``reduction`` is then the patch size.
    """

    name: str
    channels: int
    stage: int
    reduction: int
    is_head: bool = False
    tokens: bool = False


def main_tensor(h: Any) -> torch.Tensor:
    """The main tensor of what a unit returns: ``h`` itself, or the first element of a carry tuple
    ``(main, *carried)`` (a captured model's skips and tokens ride along, :mod:`.capture`)."""
    return h[0] if isinstance(h, tuple) else h


def detach_carry(h: Any, requires_grad: bool = False) -> Any:
    """``h`` cut from its graph at a module boundary: every tensor of a carry is detached (skips too, so no
    gradient crosses the boundary through them); floating ones become leaves with ``requires_grad`` when a
    cascade needs their gradient. Non-tensor values (sizes) pass unchanged."""

    def cut(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().requires_grad_(requires_grad and t.is_floating_point())

    return tuple(cut(t) for t in h) if isinstance(h, tuple) else cut(h)


def carry_tensors(h: Any) -> list[torch.Tensor]:
    """The tensors of ``h`` (one tensor, or those of a carry tuple)."""
    return [t for t in (h if isinstance(h, tuple) else (h,)) if isinstance(t, torch.Tensor)]


def grad_leaves(h: Any) -> list[torch.Tensor]:
    """The tensors of ``h`` that collect a gradient (a cascade's leaf input: its floating tensors)."""
    return [t for t in carry_tensors(h) if t.requires_grad]


def backward_carry(
    out: Any,
    grads: Sequence[torch.Tensor | None],
    inputs: Sequence[torch.Tensor] | None = None,
    retain_graph: bool = False,
) -> None:
    """``out.backward(grads)`` for a tensor or a carry: ``grads`` pairs with :func:`carry_tensors` of ``out``;
    tensors without a gradient, or that need none, are skipped. ``inputs``/``retain_graph`` as in
    :func:`torch.autograd.backward`."""
    pairs = [(o, g) for o, g in zip(carry_tensors(out), grads) if g is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward(
            [o for o, _ in pairs], grad_tensors=[g for _, g in pairs], inputs=inputs, retain_graph=retain_graph
        )


class UnitBackbone(nn.Module):
    """An ``nn.Module`` whose forward is the composition of ``units`` in order."""

    def __init__(self, units: list[nn.Module], infos: list[UnitInfo], in_channels: int, num_stages: int) -> None:
        super().__init__()
        if len(units) != len(infos):
            raise ValueError("each unit needs exactly one UnitInfo")
        self.units = nn.ModuleList(units)
        self.infos = list(infos)
        self.in_channels = in_channels
        self.num_stages = num_stages
        # Set by from_module: the module ends its ``cuts`` ask for, or the ``k`` it was given (the engine uses
        # them when split.k / split.ends say nothing else).
        self.planned_ends: list[int] | None = None
        self.planned_k: int | None = None
        # The backbone's own weight init, or None for torch's defaults. The reference code builds its aux nets
        # inside the network, so the network's init loop covers them too; the methods apply this to every aux
        # net they build (docs/methods.md, "Aux-net initialisation").
        self.weight_init: Callable[[nn.Module], None] | None = None

    def __len__(self) -> int:
        return len(self.units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x

    def configure_split(self, ends: list[int]) -> None:
        """Told by the engine where the local modules end (exclusive unit indices). Plain chains need nothing;
        a backbone with skip connections across units (a detector's FPN taps) detaches those that cross a
        module boundary, so no gradient leaves its module."""

    def cross_module_reads(self, ends: list[int]) -> list[str]:
        """Names of unit outputs that a later module reads besides what the units pass on (a detector's FPN
        taps). Only what units pass on crosses processes under PPLL, which therefore refuses a split with any."""
        return []

    def carries_across(self, ends: list[int]) -> list[str]:
        """Values passed across the module boundaries besides the main activation (a captured model's skips and
        class tokens, carried in a tuple by the units themselves)."""
        return []

    @classmethod
    def from_sequential(cls, seq: nn.Sequential | list[nn.Module], input_shape: tuple[int, int, int]) -> UnitBackbone:
        """Wrap a user's own ``nn.Sequential`` (or list of modules): each child is a unit, the last is the head.

        ``input_shape`` is (C, H, W) of one sample; a dry run on zeros (in eval mode, so BN statistics stay
        untouched) records each unit's output width and downsampling, which aux-net builders need.
        """
        units = list(seq)
        if len(units) < 1:
            raise ValueError("from_sequential needs at least one unit (the head)")
        shapes = []
        was_training = [m.training for m in units]
        x = torch.zeros(2, *input_shape)
        with torch.no_grad():
            for unit in units:
                unit.eval()
                x = unit(x)
                shapes.append(tuple(x.shape))
        for unit, mode in zip(units, was_training):
            unit.train(mode)
        infos = unit_infos(shapes, input_shape, [f"unit{i}" for i in range(len(units))], tokens=False)
        return cls(units, infos, input_shape[0], num_stages=max(1, max(info.stage for info in infos)))

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        example_inputs: torch.Tensor | tuple[torch.Tensor],
        cuts: Sequence[str] | None = None,
        k: int | None = None,
        output: str | int | None = None,
        leaf_modules: Sequence[str] = (),
    ) -> UnitBackbone:
        """Wrap any ``nn.Module``: its forward is captured (torch.export; torch.fx with ``leaf_modules``) and cut
        into units (:mod:`.capture`).

        ``cuts``: fully qualified submodule names (``["layer1", "layer2.3"]``); the local modules end after each,
        so K = len(cuts) + 1. Without cuts, ``k`` (or ``split.k``) modules are balanced over automatic cut points
        (after each block) like a zoo backbone's split. ``output``: the key, attribute or index of the prediction
        in a dict / tuple / dataclass output (default ``.logits``, else the first tensor). ``leaf_modules``:
        submodules kept opaque (data-dependent control flow; capture then traces with torch.fx); they stay inside
        one unit.

        The returned backbone's ``state_dict()`` is the original model's (same keys, ``load_state_dict(strict=True)``
        into the user's class works), and it trains the model's own parameters and buffers.
        """
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or inputs[0].dim() < 2:
            raise CaptureError(
                "example_inputs must be one batched tensor (B, ...) like the training inputs; a model with several "
                "inputs needs a wrapper module that takes one"
            )
        if cuts is not None and k is not None and k != len(cuts) + 1:
            raise CaptureError(f"{len(cuts)} cuts make {len(cuts) + 1} modules, not k={k}; give cuts or k")
        if k is not None and k < 1:
            raise CaptureError(f"k must be >= 1 (the number of local modules), got {k}")
        captured = capture(model, inputs[0], cuts, output, leaf_modules)
        x = inputs[0]
        infos = unit_infos(captured.shapes, tuple(x.shape[1:]), [names[0] for names in captured.names])
        backbone = ModuleBackbone(units=captured.units, infos=infos, in_channels=int(x.shape[1]), source=model)
        backbone.cut_names, backbone.carried, backbone.untensored = (
            captured.names,
            captured.carried,
            captured.untensored,
        )
        backbone.planned_ends = captured.planned_ends
        backbone.planned_k = k
        if captured.planned_ends is not None:  # refuse cuts that leave a module empty or split a shared parameter
            backbone.configure_split(captured.planned_ends)
        return backbone


def unit_infos(
    shapes: Sequence[tuple[int, ...]], input_shape: tuple[int, ...], names: Sequence[str], tokens: bool = True
) -> list[UnitInfo]:
    """Unit metadata from each unit's output shape (batch first): width, downsampling (the patch side for
    (B, N, C) tokens when ``tokens``), stage (+1 whenever the downsampling changes); the last unit is the head."""
    infos, stage, last_reduction = [], 0, 1
    side = input_shape[-1]
    for i, (shape, name) in enumerate(zip(shapes, names)):
        is_head = i == len(shapes) - 1
        is_tokens = tokens and len(shape) == 3 and not is_head
        if len(shape) == 4:
            reduction = max(1, side // shape[-1])
        elif is_tokens:
            reduction = max(1, round(side / max(1, int((shape[1]) ** 0.5))))
        else:
            reduction = last_reduction
        if reduction != last_reduction:
            stage += 1
        last_reduction = reduction
        width = shape[-1] if len(shape) == 3 else shape[1]  # tokens, or a language model's (B, T, vocab) logits
        infos.append(UnitInfo(name, int(width), stage, reduction, is_head=is_head, tokens=is_tokens))
    return infos


class ModuleBackbone(UnitBackbone):
    """A user's model cut into captured units (:meth:`UnitBackbone.from_module`). The model itself is a submodule
    (``source``), so ``.to()``, ``train()`` and ``parameters()`` see all of it; ``state_dict`` is the model's own."""

    def __init__(self, units: list[nn.Module], infos: list[UnitInfo], in_channels: int, source: nn.Module) -> None:
        super().__init__(units, infos, in_channels, num_stages=max(1, max(info.stage for info in infos)))
        self.source = source
        self.cut_names: list[list[str]] = []
        self.carried: list[list[str]] = []  # per cut: values carried besides the main tensor (graph node names)
        self.untensored: list[list[str]] = []  # per cut: those of them that are not tensors

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.source.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.source.load_state_dict(state_dict, strict=strict, assign=assign)

    def ends_after(self, cuts: Sequence[str]) -> list[int]:
        """Module ends (exclusive unit indices) for cuts named by submodule."""
        where = {name: i + 1 for i, names in enumerate(self.cut_names[:-1]) for name in names}
        missing = [c for c in cuts if c not in where]
        if missing:
            raise CaptureError(f"{missing[0]!r} is not a cut of this backbone; its cuts: {', '.join(where)}")
        return [*sorted(where[c] for c in cuts), len(self.units)]

    def configure_split(self, ends: list[int]) -> None:
        """Refuse a split that leaves a module without parameters, or that puts one parameter in two modules
        (each module has its own optimizer: a shared parameter would be stepped by both)."""
        owner: dict[int, int] = {}
        for m, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            params = {id(p): p for unit in self.units[start:end] for p in unit.parameters()}
            first = self.cut_names[start - 1][0] if start else "the input"
            if not params:
                raise CaptureError(
                    f"local module {m} (after {first!r}) has no parameters; move that cut or use fewer modules"
                )
            for pid in params:
                if owner.setdefault(pid, m) != m:
                    name = next(n for n, p in self.source.named_parameters(remove_duplicate=False) if id(p) == pid)
                    tied = getattr(getattr(self.source, "config", None), "tie_word_embeddings", False)
                    untie = " or untie it (model.kwargs.tie_word_embeddings=false)" if tied else ""
                    raise CaptureError(
                        f"parameter {name!r} is used by local modules {owner[pid]} and {m}; choose cuts that keep "
                        f"its users in one module{untie}"
                    )

    def cross_module_reads(self, ends: list[int]) -> list[str]:
        """Carried values that are not tensors (a size computed early, read late): they cannot cross processes."""
        return sorted({v for e in ends[:-1] for v in self.untensored[e - 1]})

    def carries_across(self, ends: list[int]) -> list[str]:
        return sorted({v for e in ends[:-1] for v in self.carried[e - 1]})
