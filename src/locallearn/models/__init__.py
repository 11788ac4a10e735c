"""Backbones as ordered units. Importing this package registers the built-in zoo."""

from . import (
    cifar_resnet,  # noqa: F401  (registers resnet8..resnet110)
    detector,  # noqa: F401  (registers fcos_resnet18, object detection)
    edsr,  # noqa: F401  (registers edsr4..edsr32, super-resolution)
    imagenet_resnet,  # noqa: F401  (registers resnet18..resnet152)
    vit,  # noqa: F401  (registers vit_tiny, vit_small, vit_base)
)
from .registry import create_model, list_models, register_model
from .units import UnitBackbone, UnitInfo

__all__ = ["UnitBackbone", "UnitInfo", "create_model", "list_models", "register_model"]
