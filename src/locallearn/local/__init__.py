"""Local-learning building blocks: splits, aux nets, losses, the task contract."""

from .split import balanced_split, list_presets, preset_split
from .task import Batch, ClassificationTask

__all__ = ["Batch", "ClassificationTask", "balanced_split", "list_presets", "preset_split"]
