"""Compression after distillation: int8 / int4 quantization, quantization-aware distillation, magnitude / 2:4 pruning, healing."""

from distill.compress.prune import apply_pruning, make_permanent, mask_2_4, sparsity
from distill.compress.quantize import (
    QUANTIZE_METHODS,
    dequantize_groups,
    dequantize_rows,
    quantize_groups,
    quantize_rows,
)
from distill.compress.store import QuantizeSpec, load_model, model_bytes, save_model

__all__ = [
    "QUANTIZE_METHODS",
    "apply_pruning",
    "make_permanent",
    "mask_2_4",
    "sparsity",
    "quantize_rows",
    "quantize_groups",
    "dequantize_groups",
    "QuantizeSpec",
    "dequantize_rows",
    "load_model",
    "model_bytes",
    "save_model",
]
