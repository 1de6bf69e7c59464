"""Pure loss functions of distill.

Every function takes logits already aligned with their targets (row ``i`` of ``student_logits``
predicts ``labels[i]``), shaped ``[N, V]``, and returns *sums* over the unmasked tokens together
with the count of those tokens. The caller divides by the count over the whole accumulation
window (and all ranks), so micro-batching never changes the result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LossTerms", "forward_kl", "hard_cross_entropy", "distillation_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


class LossTerms(NamedTuple):
    """Summed loss terms over the unmasked tokens of one micro-batch."""

    loss_sum: torch.Tensor  # alpha * ce + (1 - alpha) * T^2 * kl, summed over tokens
    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    n_tokens: int


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher/T) || softmax(student/T)); rows must be unmasked."""
    student_logprobs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(student_logprobs, teacher_logprobs, reduction="sum", log_target=True)


def hard_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -log softmax(student)[label]; rows must be unmasked."""
    return F.cross_entropy(student_logits, labels, reduction="sum")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    ignore_index: int = IGNORE_INDEX,
) -> LossTerms:
    """The seed objective, summed: ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)``.

    Shapes: ``student_logits`` and ``teacher_logits`` ``[N, V]``, ``labels`` ``[N]``. Rows whose
    label is ``ignore_index`` contribute nothing. With ``alpha == 1`` the teacher may be ``None``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    keep = labels != ignore_index
    n_tokens = int(keep.sum())
    student_rows = student_logits[keep]  # (n, V)
    ce_sum = hard_cross_entropy(student_rows, labels[keep])
    if teacher_logits is None or alpha == 1.0:
        kl_sum = student_rows.new_zeros(())
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                f"{tuple(student_logits.shape)}"
            )
        kl_sum = forward_kl(student_rows, teacher_logits[keep], temperature=temperature)
    loss_sum = alpha * ce_sum + (1.0 - alpha) * temperature**2 * kl_sum
    return LossTerms(loss_sum, ce_sum, kl_sum, n_tokens)
