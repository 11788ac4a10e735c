"""locallearn: supervised local learning for PyTorch (E2E, DGL, InfoPro in one engine).

Quick start with your own model (any ``nn.Module``, captured with torch.export and cut after named submodules)::

    import locallearn as ll
    backbone = ll.UnitBackbone.from_module(my_model, example_batch, cuts=["layer2", "layer3"])
    engine = ll.LocalEngine(backbone, ll.MethodCfg(name="dgl"), ll.ClassificationTask(10), ll.OptimCfg())
    engine.train_step(ll.Batch(x, y, raw_uint8_images))

or from a preset: ``ll.fit(ll.load_config("configs/fmnist/demo.yaml", ["method.name=dgl"]))``.
"""

from .methods import LocalMethod, MethodCfg, list_methods, register_method
from .models import UnitBackbone, UnitInfo, create_model, list_models, register_model
from .tasks import Batch, ClassificationTask, LanguageModelTask, SuperResolutionTask
from .train import LocalEngine, OptimCfg, SplitCfg, StepSchedule, TrainCfg, fit, load_config, tune_cpu_allocator

__version__ = "0.1.0"
__all__ = [
    "Batch",
    "ClassificationTask",
    "LanguageModelTask",
    "LocalEngine",
    "LocalMethod",
    "MethodCfg",
    "OptimCfg",
    "SplitCfg",
    "StepSchedule",
    "SuperResolutionTask",
    "TrainCfg",
    "UnitBackbone",
    "UnitInfo",
    "create_model",
    "fit",
    "list_methods",
    "list_models",
    "load_config",
    "register_method",
    "register_model",
    "tune_cpu_allocator",
]
