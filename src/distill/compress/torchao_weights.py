"""torchao's weight-only tensors holding distill's grids, for the Linears where they run fastest.

torchao (the ``quantize`` extra) runs a weight-only Linear on CPU by de-quantizing the whole
weight on each call and handing it to the float matmul: ``Int8Tensor`` for int8 rows and
``IntxUnpackedToInt8Tensor`` (one byte per code) for int4 groups, the tensors its
``Int8WeightOnlyConfig`` and ``IntxWeightOnlyConfig`` make. For weights small enough that their
float copy stays in cache (a decoder layer's) this is faster at batch 1 than PyTorch's packed
CPU kernels (2x for int8, 1.4x for int4); for a vocabulary-sized head the packed kernels win
(``benchmarks/weight_only_kernels.py`` measures both). :class:`~distill.compress.quantize.
WeightOnlyLinear` uses these tensors below :data:`TORCHAO_MAX_WEIGHTS` weights when torchao is
installed.

The tensors are built from distill's codes and scales (sharing their memory), not quantized
again by torchao, so the grid that runs is the one stored in safetensors, written to GGUF and
trained through by QAD.
"""

from __future__ import annotations

import torch

__all__ = ["TORCHAO_MAX_WEIGHTS", "torchao_weight"]

# Between the decoder's largest Linear (0.9M weights) and the 28M of SmolLM2's head, where the
# packed kernels are faster (benchmarks/weight_only_kernels.py); set from a sweep of sizes.
TORCHAO_MAX_WEIGHTS = 6_000_000

_quantization = None


def _torchao_quantization():
    """``torchao.quantization``, imported once; None when torchao is not installed. (It logs a
    warning per CUDA extension it cannot load; the CLI silences them. transformers imports it
    too when present.)"""
    global _quantization
    if _quantization is None:
        try:
            import torchao.quantization as quantization
        except Exception:  # absent, or broken against this torch: either way not used
            quantization = False
        _quantization = quantization
    return _quantization or None


def torchao_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor | None = None,
    group_size: int = 0,
) -> torch.Tensor | None:
    """A torchao weight tensor computing with exactly distill's grid, or None without torchao.

    int8 rows (``low`` None): ``codes`` int8 ``[out, in]``, ``scale`` ``[out]``, weight
    ``codes * scale``. int4 groups: ``codes`` in [0, 15] ``[out, in]``, ``scale`` and ``low``
    ``[out, in / group_size]``, weight ``codes * scale + low``, which torchao writes
    ``(codes - zero) * scale`` with ``zero = -low / scale``. int8 ``codes`` are used as they are
    (torchao's unpacked layout takes any int8 range), so no weight is copied; the zero points are
    computed here, so a caller that changes ``scale`` or ``low`` builds the tensor again.
    """
    quantization = _torchao_quantization()
    if quantization is None:
        return None
    out_features, in_features = codes.shape
    if low is None:
        return quantization.Int8Tensor(
            codes, scale.float().reshape(out_features, 1), [1, in_features], torch.float32
        )
    scale = scale.float()
    return quantization.IntxUnpackedToInt8Tensor(
        codes.to(torch.int8),  # a no-op for int8 codes
        scale,
        -low.float() / scale,  # zero point [out, in / group_size]
        torch.int8,
        (1, group_size),
        torch.float32,
        None,
    )
