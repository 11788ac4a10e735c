"""Training: the factory (:mod:`.build`), the engine, the one trainer and its single-process runtime."""

from .allocator import allocator_setting, tune_cpu_allocator
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, DataCfg, ModelCfg, OptimCfg, RunCfg, SplitCfg, TrainCfg, load_config
from .engine import LocalEngine, StepResult
from .entry import fit
from .schedule import StepSchedule
from .split import resolve_split
from .trainer import Trainer

__all__ = [
    "ConfigError",
    "DataCfg",
    "LocalEngine",
    "ModelCfg",
    "OptimCfg",
    "RunCfg",
    "SplitCfg",
    "StepResult",
    "StepSchedule",
    "TrainCfg",
    "Trainer",
    "fit",
    "load_checkpoint",
    "load_config",
    "resolve_split",
    "save_checkpoint",
    "allocator_setting",
    "tune_cpu_allocator",
]
