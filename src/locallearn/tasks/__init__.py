"""Tasks: what a network is trained to do (its loss, its metrics, the head an aux net predicts it with).

Classification and super-resolution (:mod:`.task`), detection (:mod:`.detection`), language modelling
(:mod:`.language_model`); the engine and every method
see only the :class:`~.task.Task` contract, so nothing assumes classification (docs/architecture.md).
"""

from .language_model import LanguageModelTask
from .task import Batch, ClassificationTask, SuperResolutionTask, Task

__all__ = ["Batch", "ClassificationTask", "LanguageModelTask", "SuperResolutionTask", "Task"]
