"""Datasets read from their standard files, and the device-resident loader."""

from . import (
    cifar,  # noqa: F401  (registers cifar10 and cifar100)
    detection,  # noqa: F401  (registers shapes, voc and coco, object detection)
    imagefolder,  # noqa: F401  (registers imagenet and imagefolder)
    sr,  # noqa: F401  (registers sr_folder and skimage_samples, super-resolution)
    stl10,  # noqa: F401  (registers stl10)
    svhn,  # noqa: F401  (registers svhn and svhn_extra)
    text,  # noqa: F401  (registers text, byte-level language modelling)
)
from .datasets import DatasetSpec, dataset_spec, find_root, list_datasets, load_split, register_dataset
from .idx import DataError, read_idx
from .loader import ResidentLoader

__all__ = [
    "DataError",
    "DatasetSpec",
    "ResidentLoader",
    "dataset_spec",
    "find_root",
    "list_datasets",
    "load_split",
    "read_idx",
    "register_dataset",
]
