"""The training objective at one step's :class:`~distill.losses.schedule.LossSettings`: the
boundary where that object is unpacked into the pure loss functions' keyword arguments.

:func:`head_distillation_loss` starts from the student's last hidden states and output head,
whatever the teacher gave (full logits, a cache's top-k, or nothing): full teacher logits go to
the fused chunked loss (``fused=True``: the student's ``[N, V]`` logits are never built) or to
the unfused :func:`distillation_loss` on full logits; both take every divergence. Top-k
:class:`SparseTargets` (a cache or a served teacher) need the full student logits and support
forward KL, reverse KL and JSD on the coarse outcomes, with the ``T^2`` factor.
:func:`logits_distillation_loss` is the same objective on logits a model already returned
(classifiers, encoders).
"""

from __future__ import annotations

import torch

from distill.losses.functional import IGNORE_INDEX, LossTerms, distillation_loss
from distill.losses.fused import fused_distillation_loss
from distill.losses.schedule import LossSettings
from distill.losses.sparse import SPARSE_DIVERGENCES, SparseTargets, soft_target_loss

__all__ = ["head_distillation_loss", "logits_distillation_loss"]


def _divergence_options(settings: LossSettings) -> dict:
    return {
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "divergence": settings.divergence,
        "beta": settings.beta,
        "skew": settings.skew,
        "scale_by_t2": settings.scale_by_t2,
    }


def logits_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    settings: LossSettings,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> LossTerms:
    """:func:`~distill.losses.distillation_loss` at ``settings``. Shapes ``[N, C]``, ``[N]``."""
    return distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        ignore_index=ignore_index,
        **_divergence_options(settings),
    )


def head_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor | SparseTargets | None,
    labels: torch.Tensor,
    settings: LossSettings,
) -> LossTerms:
    """Summed loss terms of the logits ``hidden @ weight^T + bias`` at ``settings``.

    Shapes: ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``labels`` ``[N]``; ``targets`` full
    teacher logits with leading dims flattening to ``N`` (``[..., V]``), sparse top-k rows, or
    None (labels only).
    """
    if isinstance(targets, SparseTargets):
        if settings.divergence not in SPARSE_DIVERGENCES or not settings.scale_by_t2:
            raise ValueError(
                f"divergence={settings.divergence!r}, scale_by_t2={settings.scale_by_t2}: sparse "
                f"top-k targets support divergence in {SPARSE_DIVERGENCES} with scale_by_t2 only"
            )
        logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
        return soft_target_loss(
            logits,
            targets,
            labels,
            temperature=settings.temperature,
            alpha=settings.alpha,
            sparse=settings.sparse,
            divergence=settings.divergence,
            beta=settings.beta,
        )
    vocab = weight.shape[0]
    teacher_logits = None if targets is None else targets.reshape(-1, vocab)  # (N, V)
    if settings.fused:
        return fused_distillation_loss(
            hidden,
            weight,
            teacher_logits,
            labels,
            bias=bias,
            chunk_size=settings.chunk_size,
            memory_budget_mb=settings.memory_budget_mb,
            **_divergence_options(settings),
        )
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    return distillation_loss(logits, teacher_logits, labels, **_divergence_options(settings))
