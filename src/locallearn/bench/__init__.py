"""Benchmarks: methods side by side on memory, speed, FLOPs and accuracy (``locallearn bench``), and figures
(``locallearn plot``). Sits above :mod:`locallearn.train` and :mod:`locallearn.methods`; nothing below imports it."""

from .bench import KINDS, engine_flops, run_bench
from .variants import Variant, parse_method, parse_variants, variant_config

__all__ = ["KINDS", "Variant", "engine_flops", "parse_method", "parse_variants", "run_bench", "variant_config"]
