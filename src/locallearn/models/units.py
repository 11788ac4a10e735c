"""The backbone contract: an ordered list of units (spec methods.md §10.1.1).

A split groups consecutive units into K gradient-isolated local modules; the model itself knows nothing of
methods or splits. Each unit carries metadata that aux-net builders need at a split point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
        """Names of unit outputs that a later module reads besides the chain's activation (a detector's FPN taps).
        Only the chain's activation crosses processes under PPLL, which therefore refuses a split with any."""
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
        infos: list[UnitInfo] = []
        was_training = [m.training for m in units]
        x = torch.zeros(2, *input_shape)
        stage, last_reduction = 0, 1
        with torch.no_grad():
            for i, unit in enumerate(units):
                unit.eval()
                x = unit(x)
                is_head = i == len(units) - 1
                reduction = input_shape[-1] // x.shape[-1] if x.dim() == 4 else last_reduction
                if reduction != last_reduction:
                    stage += 1
                last_reduction = reduction
                infos.append(UnitInfo(f"unit{i}", int(x.shape[1]), stage, reduction, is_head=is_head))
        for unit, mode in zip(units, was_training):
            unit.train(mode)
        return cls(units, infos, input_shape[0], num_stages=max(1, stage))
