"""Compression after distillation: int8 quantization, magnitude / 2:4 pruning, healing."""

from distill.compress.prune import apply_pruning, make_permanent, mask_2_4, sparsity
from distill.compress.quantize import QUANTIZE_METHODS, dequantize_rows, quantize_rows
from distill.compress.store import load_model, model_bytes, save_model

__all__ = [
    "QUANTIZE_METHODS",
    "apply_pruning",
    "make_permanent",
    "mask_2_4",
    "sparsity",
    "quantize_rows",
    "dequantize_rows",
    "load_model",
    "model_bytes",
    "save_model",
]
