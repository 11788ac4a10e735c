"""Local-learning building blocks: splits, aux nets, losses, the task contract."""

from .split import balanced_split, list_presets, preset_split
from .task import Batch, ClassificationTask, SuperResolutionTask, Task

__all__ = [
    "Batch",
    "ClassificationTask",
    "SuperResolutionTask",
    "Task",
    "balanced_split",
    "list_presets",
    "preset_split",
]
