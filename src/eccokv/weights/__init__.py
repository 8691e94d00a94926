"""Compressed model weights: `compress_model`, `EccoLinear`, `memory_report`.

Linear layers hold their weights as codec blocks (Ecco with the shipped weights profile
by default; any registered codec works, e.g. int4 g128 round-to-nearest as a baseline),
decoded inside the layer's matmul (a fused decode-GEMV for decode steps). See
docs/weights.md.
"""

from eccokv.weights.compress import (
    DEFAULT_SKIP,
    activation_moments,
    compress_model,
    linear_layers,
    memory_report,
    weight_codec,
)
from eccokv.weights.hf import EccoQuantConfig
from eccokv.weights.linear import EccoLinear

__all__ = [
    "DEFAULT_SKIP",
    "EccoLinear",
    "EccoQuantConfig",
    "activation_moments",
    "compress_model",
    "linear_layers",
    "memory_report",
    "weight_codec",
]
