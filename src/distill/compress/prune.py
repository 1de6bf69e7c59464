"""Magnitude pruning of the decoder's Linear layers with ``torch.nn.utils.prune``.

Two patterns: ``unstructured`` zeroes the ``amount`` smallest-magnitude weights of each Linear
(L1, layer by layer); ``2:4`` keeps the 2 largest of every 4 consecutive weights along the input
dimension (the semi-structured pattern sparse tensor cores accelerate; exactly 50%). The output
head and the embeddings are left dense: they are shared (tied) and every token depends on them.

:func:`apply_pruning` leaves PyTorch's reparametrisation in place (``weight = weight_orig * mask``)
so a healing distillation keeps the zeros; :func:`make_permanent` then bakes the masks in.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

__all__ = [
    "PRUNE_PATTERNS",
    "prunable_linears",
    "mask_2_4",
    "apply_pruning",
    "make_permanent",
    "sparsity",
]

PRUNE_PATTERNS = ("unstructured", "2:4")


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' Linear modules (``...layers.N...``), by qualified name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """0/1 mask keeping the 2 largest |w| in each group of 4 along the last dimension."""
    out_features, in_features = weight.shape
    if in_features % 4:
        raise ValueError(f"2:4 pruning needs in_features divisible by 4, got {in_features}")
    groups = weight.detach().abs().reshape(out_features, in_features // 4, 4)  # (out, in/4, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    return mask.reshape(out_features, in_features)


def apply_pruning(model: nn.Module, amount: float, pattern: str = "unstructured") -> list[str]:
    """Prune every decoder Linear in place (masks kept as hooks); returns the pruned names."""
    if pattern not in PRUNE_PATTERNS:
        raise ValueError(f"pattern must be one of {PRUNE_PATTERNS}, got {pattern!r}")
    if not 0.0 < amount < 1.0:
        raise ValueError(f"amount must be in (0, 1), got {amount}")
    linears = prunable_linears(model)
    if not linears:
        raise ValueError("model has no Linear layers under '.layers.' to prune")
    for module in linears.values():
        if pattern == "2:4":
            prune.custom_from_mask(module, "weight", mask_2_4(module.weight))
        else:
            prune.l1_unstructured(module, "weight", amount=amount)
    return list(linears)


def make_permanent(model: nn.Module) -> None:
    """Remove the pruning hooks, leaving plain weights with the zeros baked in."""
    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_orig"):
            prune.remove(module, "weight")


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over the prunable Linear layers."""
    weights = [module.weight for module in prunable_linears(model).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))
