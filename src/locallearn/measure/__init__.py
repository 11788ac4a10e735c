"""Meters: saved-activation memory, parameter/gradient/optimizer bytes, CUDA peaks, peak RSS, FLOPs, speed."""

from .memory import (
    AllocatorPeak,
    CudaPeak,
    SavedTensorMeter,
    cuda_peak_bytes,
    model_state_bytes,
    peak_rss_bytes,
    reset_cuda_peak,
    reset_peak_rss,
    tensor_bytes,
)
from .profile import count_params, forward_flops, train_flops, unit_costs

__all__ = [
    "AllocatorPeak",
    "CudaPeak",
    "SavedTensorMeter",
    "count_params",
    "cuda_peak_bytes",
    "forward_flops",
    "model_state_bytes",
    "peak_rss_bytes",
    "reset_cuda_peak",
    "reset_peak_rss",
    "tensor_bytes",
    "train_flops",
    "unit_costs",
]
