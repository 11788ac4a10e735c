"""Meters: saved-activation memory, CUDA peaks, parameters and FLOPs."""

from .memory import SavedTensorMeter, cuda_peak_bytes, reset_cuda_peak
from .profile import count_params, forward_flops, unit_costs

__all__ = ["SavedTensorMeter", "count_params", "cuda_peak_bytes", "forward_flops", "reset_cuda_peak", "unit_costs"]
