"""The training objective from the student's last hidden states and output head: the one call
the loop makes, whatever the teacher gave (full logits, a cache's top-k, or nothing).

Full teacher logits go to the fused chunked loss (``fused=True``: the student's ``[N, V]``
logits are never built) or to the unfused :func:`distillation_loss` on full logits; both take
every divergence. A cache's top-k :class:`SparseTargets` need the full student logits and support
the forward KL with the ``T^2`` factor only.
"""

from __future__ import annotations

import torch

from distill.losses.functional import LossTerms, distillation_loss
from distill.losses.fused import DEFAULT_MEMORY_BUDGET_MB, fused_distillation_loss
from distill.losses.sparse import SparseTargets, SparseVariant, soft_target_loss

__all__ = ["head_distillation_loss"]


def head_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor | SparseTargets | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    scale_by_t2: bool = True,
    fused: bool = True,
    chunk_size: int = 0,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    sparse: SparseVariant = "tail_bucket",
) -> LossTerms:
    """Summed loss terms of the logits ``hidden @ weight^T + bias``.

    Shapes: ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``labels`` ``[N]``; ``targets`` full
    teacher logits with leading dims flattening to ``N`` (``[..., V]``), sparse top-k rows, or
    None (labels only).
    """
    if isinstance(targets, SparseTargets):
        if divergence != "forward_kl" or not scale_by_t2:
            raise ValueError(
                f"divergence={divergence!r}, scale_by_t2={scale_by_t2}: a sparse top-k teacher "
                "cache supports divergence='forward_kl' with scale_by_t2 only"
            )
        logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
        return soft_target_loss(
            logits, targets, labels, temperature=temperature, alpha=alpha, sparse=sparse
        )
    vocab = weight.shape[0]
    teacher_logits = None if targets is None else targets.reshape(-1, vocab)  # (N, V)
    options = {
        "temperature": temperature,
        "alpha": alpha,
        "divergence": divergence,
        "beta": beta,
        "skew": skew,
        "scale_by_t2": scale_by_t2,
    }
    if fused:
        return fused_distillation_loss(
            hidden,
            weight,
            teacher_logits,
            labels,
            bias=bias,
            chunk_size=chunk_size,
            memory_budget_mb=memory_budget_mb,
            **options,
        )
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    return distillation_loss(logits, teacher_logits, labels, **options)
