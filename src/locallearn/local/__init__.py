"""Local-learning building blocks: splits, aux nets, losses, activation checkpointing."""

from .split import balanced_split, list_presets, preset_split

__all__ = ["balanced_split", "list_presets", "preset_split"]
