"""Benchmarks: methods side by side on memory, speed, FLOPs and accuracy (``locallearn bench``), and figures
(``locallearn plot``). Sits above :mod:`locallearn.train` and :mod:`locallearn.methods`; nothing below imports it."""

from .bench import KINDS, Variant, engine_flops, parse_variants, run_bench

__all__ = ["KINDS", "Variant", "engine_flops", "parse_variants", "run_bench"]
