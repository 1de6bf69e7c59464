"""Pure loss functions of distill (the unfused path: full ``[N, V]`` logits, autograd).

Every function takes logits already aligned with their targets (row ``i`` of ``student_logits``
predicts ``labels[i]``), shaped ``[N, V]``, and returns *sums* over the unmasked tokens together
with the count of those tokens. The caller divides by the count over the whole accumulation
window (and all ranks), so micro-batching never changes the result.

The objective, per unmasked token::

    alpha * CE(student, label) + (1 - alpha) * s * D(softmax(teacher / T), softmax(student / T))

``D`` is one of :data:`distill.losses.divergences.DIVERGENCES`; ``s = T^2`` with ``scale_by_t2``
(Hinton et al. 2015: the soft-target gradients shrink as ``1 / T^2``, so ``T^2`` keeps their
size comparable to the hard term's when ``T`` changes), else ``s = 1``. The hard cross-entropy
uses the student's logits at ``T = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from distill.losses.divergences import DIVERGENCES

__all__ = [
    "IGNORE_INDEX",
    "LossSpec",
    "LossTerms",
    "distillation_loss",
    "forward_kl",
    "hard_cross_entropy",
    "jsd",
    "kept_rows",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_divergence",
    "total_variation",
]

IGNORE_INDEX = -100


class LossTerms(NamedTuple):
    """Summed loss terms over the unmasked tokens of one micro-batch."""

    loss_sum: torch.Tensor  # alpha * ce + (1 - alpha) * s * divergence, summed over tokens
    ce_sum: torch.Tensor
    divergence_sum: torch.Tensor  # the chosen divergence D (forward KL by default)
    n_tokens: int

    @property
    def kl_sum(self) -> torch.Tensor:
        """Alias of ``divergence_sum`` (the seed's name, from when D was always forward KL)."""
        return self.divergence_sum


@dataclass(frozen=True)
class LossSpec:
    """Hyper-parameters of one loss evaluation; invalid values raise ``ValueError`` naming them.

    ``beta`` is used by ``divergence="jsd"`` only, ``skew`` by the two skew KLs only.
    """

    temperature: float
    alpha: float
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    scale_by_t2: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {sorted(DIVERGENCES)}, got {self.divergence!r}"
            )
        if not 0.0 < self.beta < 1.0:
            raise ValueError(
                f"beta must be in (0, 1), got {self.beta} (its limits are the forward KL at "
                "beta -> 0 and the reverse KL at beta -> 1: use those divergences)"
            )
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must be in [0, 1), got {self.skew}")

    @property
    def param(self) -> float:
        """The chosen divergence's parameter (beta, skew, or unused)."""
        kind = DIVERGENCES[self.divergence].param
        return self.beta if kind == "beta" else self.skew if kind == "skew" else 0.0

    @property
    def soft_weight(self) -> float:
        """Weight of the divergence sum in the loss: ``(1 - alpha) * (T^2 or 1)``."""
        return (1.0 - self.alpha) * (self.temperature**2 if self.scale_by_t2 else 1.0)


def kept_rows(labels: torch.Tensor, rows: int, vocab: int, ignore_index: int) -> torch.Tensor:
    """Boolean mask ``[N]`` of the unmasked rows; rejects empty, fully masked or bad labels."""
    if labels.dim() != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if rows == 0:
        raise ValueError("labels: the batch is empty (0 tokens)")
    keep = labels != ignore_index
    if not bool(keep.any()):
        raise ValueError(f"labels: every token is masked (ignore_index={ignore_index})")
    kept = labels[keep]
    if int(kept.min()) < 0 or int(kept.max()) >= vocab:
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}")
    return keep


def soft_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Sum over rows of ``D(softmax(teacher / T), softmax(student / T))``; rows must be unmasked."""
    spec = LossSpec(temperature, 0.0, divergence, beta, skew)
    logq = F.log_softmax(student_logits / temperature, dim=-1)
    logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    return DIVERGENCES[divergence].value(logq, logp, spec.param).sum()


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher/T) || softmax(student/T)): mode-covering."""
    return soft_divergence(student_logits, teacher_logits, temperature=temperature)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over rows of KL(softmax(student/T) || softmax(teacher/T)): mode-seeking (MiniLLM)."""
    return soft_divergence(
        student_logits, teacher_logits, divergence="reverse_kl", temperature=temperature
    )


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Sum over rows of the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024):

    ``JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``,
    ``p`` the teacher's and ``q`` the student's distribution, ``0 < beta < 1``. ``beta = 0.5`` is
    the symmetric Jensen-Shannon divergence. Both ends vanish, so the limits are taken after
    normalising: ``JSD_beta / beta -> KL(p || q)`` (forward) as ``beta -> 0`` and
    ``JSD_beta / (1 - beta) -> KL(q || p)`` (reverse) as ``beta -> 1``.
    """
    return soft_divergence(
        student_logits, teacher_logits, divergence="jsd", temperature=temperature, beta=beta
    )


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """Sum over rows of DistiLLM's skew KL: ``KL(p || skew p + (1 - skew) q)``; skew 0 = forward KL."""
    return soft_divergence(
        student_logits,
        teacher_logits,
        divergence="skew_forward_kl",
        temperature=temperature,
        skew=skew,
    )


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> torch.Tensor:
    """Sum over rows of DistiLLM's skew reverse KL: ``KL(q || skew q + (1 - skew) p)``."""
    return soft_divergence(
        student_logits,
        teacher_logits,
        divergence="skew_reverse_kl",
        temperature=temperature,
        skew=skew,
    )


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over rows of the total variation distance ``1/2 sum |p - q|`` (in [0, 1] per row)."""
    return soft_divergence(student_logits, teacher_logits, divergence="tv", temperature=temperature)


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
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    scale_by_t2: bool = True,
) -> LossTerms:
    """The objective of the module docstring, summed over the unmasked tokens.

    Shapes: ``student_logits`` and ``teacher_logits`` ``[N, V]``, ``labels`` ``[N]``. Rows whose
    label is ``ignore_index`` contribute nothing. With ``alpha == 1`` the teacher may be ``None``.
    """
    spec = LossSpec(temperature, alpha, divergence, beta, skew, scale_by_t2)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    keep = kept_rows(labels, *student_logits.shape, ignore_index)
    n_tokens = int(keep.sum())
    student_rows = student_logits[keep]  # (n, V)
    ce_sum = hard_cross_entropy(student_rows, labels[keep])
    if teacher_logits is None or alpha == 1.0:
        divergence_sum = student_rows.new_zeros(())
    else:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
                f"{tuple(student_logits.shape)}"
            )
        divergence_sum = soft_divergence(
            student_rows,
            teacher_logits[keep],
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            skew=skew,
        )
    loss_sum = alpha * ce_sum + spec.soft_weight * divergence_sum
    return LossTerms(loss_sum, ce_sum, divergence_sum, n_tokens)
