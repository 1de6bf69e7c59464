"""Post-training int8 quantization of a causal LM's Linear layers (and its embedding on disk).

Weights are quantized per output row, symmetrically: ``q = round(w / s)`` with
``s = max|w_row| / 127``, ``q`` in [-127, 127]. Two runtime kernels share this on-disk format:

- ``int8``: PyTorch's own dynamic quantization (``torch.ao`` ``DynamicQuantizedLinear``, fbgemm /
  x86): int8 weights, activations quantized per batch on the fly, int8 matmuls.
- ``int8-weight-only``: torchao's ``Int8WeightOnlyConfig`` (int8 weights, float activations);
  needs ``pip install torchao`` (optional). torchao 0.18 has no float32 int4 kernel on CPU
  (its int4 layouts need CUDA, bfloat16 or the ``mslk`` package), so int4 is not offered.

The input embedding is stored the same way (per-row int8) and de-quantized on load: a lookup
reads one row per token, so it stays float in memory; with tied embeddings the output head
reuses the embedding's int8 rows, so they are stored once.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = [
    "QUANTIZE_METHODS",
    "quantize_rows",
    "dequantize_rows",
    "linear_names",
    "install_int8_linears",
]

QUANTIZE_METHODS = ("int8", "int8-weight-only")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 ``[out, in]`` and float32 ``[out]`` with ``weight ~= q * scale[:, None]``."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows stay zero
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 ``[out, in]`` from :func:`quantize_rows`' output."""
    return q.float() * scale[:, None].float()


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` (decoder projections and the output head)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _dynamic_linear(linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """A ``DynamicQuantizedLinear`` holding exactly ``q`` and ``scale`` (no re-quantization)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    out_features, in_features = q.shape
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated (2.13)
        warnings.simplefilter("ignore", UserWarning)
        module = DynamicLinear(in_features, out_features, bias_=linear.bias is not None)
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(out_features, dtype=torch.long), 0
        )
        bias = None if linear.bias is None else linear.bias.detach().float()
        module.set_weight_bias(qweight, bias)
    return module


def install_int8_linears(
    model: nn.Module, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], method: str
) -> nn.Module:
    """Swap the Linear layers named in ``quantized`` (``name -> (q, scale)``) for int8 ones.

    ``model`` must already hold the de-quantized weights (float32), which ``int8-weight-only``
    re-quantizes with torchao (per-row symmetric too, so it recovers the same int8 rows).
    """
    if method not in QUANTIZE_METHODS:
        raise ValueError(f"method must be one of {QUANTIZE_METHODS}, got {method!r}")
    if method == "int8":
        for name, (q, scale) in quantized.items():
            _set_module(model, name, _dynamic_linear(model.get_submodule(name), q, scale))
        return model
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ImportError(
            "int8-weight-only needs torchao: pip install 'distill[compress]'"
        ) from None
    names = set(quantized)
    # Untie the head first: torchao swaps the weight Parameter, which must not change the embedding.
    for name in names:
        linear = model.get_submodule(name)
        linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in names)
    return model
