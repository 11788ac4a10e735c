"""Single-process training: config, engine, loop, checkpoints."""

from .allocator import allocator_setting, tune_cpu_allocator
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, DataCfg, ModelCfg, OptimCfg, RunCfg, TrainCfg, load_config
from .engine import LocalEngine, resolve_split
from .loop import fit

__all__ = [
    "ConfigError",
    "DataCfg",
    "LocalEngine",
    "ModelCfg",
    "OptimCfg",
    "RunCfg",
    "TrainCfg",
    "fit",
    "load_checkpoint",
    "load_config",
    "resolve_split",
    "save_checkpoint",
    "allocator_setting",
    "tune_cpu_allocator",
]
