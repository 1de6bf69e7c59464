"""Sparse soft targets (a teacher's top-k, e.g. from the on-disk cache) and the KD losses on them.

A :class:`SparseTargets` row holds, for one token, the ids ``S`` of the teacher's k largest
logits, their log-probabilities at T = 1 (``lp_i = z_i - logsumexp(z)``), and for each stored
temperature ``T`` the full-row log-normaliser of the log-probabilities,
``c_T = logsumexp_j(lp_j / T)`` (over the whole vocabulary, ``c_1 = 0``). The teacher's
probabilities at ``T`` of the kept tokens are then exact (up to the storage dtype):

    log p_i(T) = z_i / T - logsumexp(z / T) = lp_i / T - c_T            for i in S

``c_T`` cannot be recovered from the top-k and ``c_1`` alone. With the tail's T = 1
probabilities ``x_j`` (``n = V - k`` of them, each <= ``p_k``, the k-th kept probability, summing
to the known tail mass ``m``), the tail's unnormalised mass at ``T > 1`` is ``sum_j x_j^(1/T)``,
which may lie anywhere in ``[m p_k^(1/T - 1), n^(1 - 1/T) m^(1/T)]`` (mass on few tokens vs.
spread evenly), a ratio of up to ``(n p_k / m)^(1 - 1/T)``: about 22 for V = 49152, k = 64, T = 2,
m = 0.1, p_k = 1e-3. No approximation is usable, so the cache stores ``c_T`` for a list of
temperatures (4 bytes per token each) and the tail-bucket loss refuses any other ``T``.

Both losses take full student logits ``[N, V]`` and rows of targets ``[N, k]`` and return sums
over rows (the caller normalises over the accumulation window, as in ``functional.py``).

Other divergences on the same outcomes (:func:`sparse_divergence`): with the teacher's ``(k+1)``
outcome probabilities ``p`` (kept tokens, tail bucket) and the student's ``q`` on the same
outcomes, forward KL(p || q), reverse KL(q || p) and GKD's JSD are all well defined and exact for
those coarse distributions; on-policy batches from a served teacher use them. The renormalised
variant takes them on the ``k`` kept outcomes instead.

A served teacher (``distill.teacher.remote``) returns log-probabilities at ``T = 1`` only: its
targets carry ``c_1 = 0`` and nothing else, so the tail bucket is exact at ``T = 1`` and the
renormalised loss at any ``T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from distill.losses.functional import (
    IGNORE_INDEX,
    LossTerms,
    distillation_loss,
    hard_cross_entropy,
)

__all__ = [
    "SparseTargets",
    "SparseVariant",
    "tail_bucket_kl",
    "renormalized_topk_kl",
    "sparse_outcome_logprobs",
    "sparse_divergence",
    "sparse_distillation_loss",
    "soft_target_loss",
]

SparseVariant = Literal["tail_bucket", "renormalized"]


@dataclass(frozen=True)
class SparseTargets:
    """A teacher's top-k per token; leading dims ``[...]`` are the token positions."""

    ids: torch.Tensor  # (..., k) int64, the k largest teacher logits' token ids
    logprobs: torch.Tensor  # (..., k) float32, log softmax(teacher logits) at T = 1 of those ids
    lognorm: torch.Tensor  # (..., n_T) float32, c_T = logsumexp over the full row of lp / T
    temperatures: tuple[float, ...]  # the T of each lognorm column
    # (...,) float32, log softmax at T = 1 of the token that follows in the teacher's own row
    # (a cross-tokenizer cache's chain rule needs it, top-k or not); None when not stored
    realised: torch.Tensor | None = None

    def rows(self) -> SparseTargets:
        """Leading dims flattened: ``[N, k]``, ``[N, n_T]`` and ``[N]``."""
        k, n_t = self.ids.shape[-1], self.lognorm.shape[-1]
        return SparseTargets(
            self.ids.reshape(-1, k),
            self.logprobs.reshape(-1, k),
            self.lognorm.reshape(-1, n_t),
            self.temperatures,
            None if self.realised is None else self.realised.reshape(-1),
        )

    def select(self, keep: torch.Tensor) -> SparseTargets:
        """Rows where the boolean ``keep`` ``[N]`` is true."""
        return SparseTargets(
            self.ids[keep],
            self.logprobs[keep],
            self.lognorm[keep],
            self.temperatures,
            None if self.realised is None else self.realised[keep],
        )

    def to(self, device: torch.device | str) -> SparseTargets:
        """The same targets on ``device``."""
        return SparseTargets(
            self.ids.to(device),
            self.logprobs.to(device),
            self.lognorm.to(device),
            self.temperatures,
            None if self.realised is None else self.realised.to(device),
        )

    def lognorm_at(self, temperature: float) -> torch.Tensor:
        """``c_T`` ``[...]`` of a stored temperature (a ValueError for any other)."""
        for column, stored in enumerate(self.temperatures):
            if math.isclose(stored, temperature, rel_tol=1e-9, abs_tol=1e-12):
                return self.lognorm[..., column]
        raise ValueError(
            f"temperature={temperature}: these sparse targets hold log-normalisers for "
            f"T in {list(self.temperatures)} only (the normaliser at another T is not "
            "determined by the top-k; write the cache with that temperature)"
        )

    def teacher_logprobs(self, temperature: float) -> torch.Tensor:
        """Exact ``log softmax(z / T)`` of the kept ids, ``[..., k]``; T must be a stored one."""
        return self.logprobs / temperature - self.lognorm_at(temperature)[..., None]

    def realised_logprobs(self, temperature: float) -> torch.Tensor:
        """Exact ``log softmax(z / T)`` of each row's next token ``[...]`` (stored T only)."""
        if self.realised is None:
            raise ValueError("these sparse targets hold no realised tokens' log-probabilities")
        return self.realised / temperature - self.lognorm_at(temperature)


def _check_rows(student_logits: torch.Tensor, targets: SparseTargets) -> None:
    if student_logits.dim() != 2 or targets.ids.dim() != 2:
        raise ValueError("student_logits must be [N, V] and targets rows [N, k] (call .rows())")
    if targets.ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"targets have {targets.ids.shape[0]} rows, student_logits {student_logits.shape[0]}"
        )
    if targets.ids.numel() and int(targets.ids.max()) >= student_logits.shape[1]:
        raise ValueError(
            f"targets hold token id {int(targets.ids.max())} >= student vocab "
            f"{student_logits.shape[1]}"
        )


def tail_bucket_kl(
    student_logits: torch.Tensor, targets: SparseTargets, *, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over rows of KL over the k kept tokens plus one bucket holding the rest of the mass.

    With ``S`` the teacher's kept ids, ``p = softmax(teacher / T)``, ``q = softmax(student / T)``::

        KL = sum_{i in S} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)
        p_tail = 1 - sum_{i in S} p_i,    q_tail = sum_{j not in S} q_j

    i.e. the exact KL between the two (k + 1)-outcome distributions; it is <= the full KL and
    equals it when ``k = V``. ``p_tail`` is clamped at 0 (storage rounding can push the kept
    mass a hair above 1); ``log q_tail`` is a logsumexp over the student's non-kept logits, so
    a tiny tail stays accurate. Shapes: ``student_logits`` ``[N, V]``, ``targets`` rows ``[N, k]``.
    """
    _check_rows(student_logits, targets)
    scaled = student_logits / temperature  # (N, V)
    student_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (N, 1)
    log_q = scaled.gather(-1, targets.ids) - student_norm  # (N, k)
    log_p = targets.teacher_logprobs(temperature).to(log_q.dtype)  # (N, k)
    kept = (log_p.exp() * (log_p - log_q)).sum()
    if targets.ids.shape[-1] >= student_logits.shape[-1]:
        return kept  # k = V: no tail
    p_tail = (-torch.expm1(torch.logsumexp(log_p, dim=-1))).clamp_min(0.0)  # (N,)
    tail_logits = scaled.scatter(-1, targets.ids, float("-inf"))  # (N, V), kept ids removed
    log_q_tail = torch.logsumexp(tail_logits, dim=-1) - student_norm.squeeze(-1)  # (N,)
    tail = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return kept + tail.sum()


def renormalized_topk_kl(
    student_logits: torch.Tensor, targets: SparseTargets, *, temperature: float = 1.0
) -> torch.Tensor:
    """Sum over rows of KL(p_hat || q_hat), both renormalised over the teacher's kept ids ``S``::

        p_hat_i = exp(z_i / T) / sum_{j in S} exp(z_j / T),   likewise q_hat from the student

    The tail is ignored entirely, so no log-normaliser is needed (any T works).
    """
    _check_rows(student_logits, targets)
    log_q = torch.log_softmax(student_logits.gather(-1, targets.ids) / temperature, dim=-1)
    log_p = torch.log_softmax(targets.logprobs.to(log_q.dtype) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


_SPARSE_KL = {"tail_bucket": tail_bucket_kl, "renormalized": renormalized_topk_kl}
SPARSE_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# The smallest teacher tail probability used in log p_tail: storage rounding can make the kept
# mass reach 1, and reverse KL / JSD need a finite log p for every outcome the student keeps.
_TAIL_FLOOR = 1e-30


def sparse_outcome_logprobs(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    variant: SparseVariant = "tail_bucket",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) of teacher and student over the coarse outcomes, ``[N, k + 1]`` (tail
    bucket: the k kept ids, then the rest of the mass) or ``[N, k]`` (renormalised over the kept
    ids). The tail column of ``p`` is floored at 1e-30 (kept mass rounded up to 1 by storage)."""
    _check_rows(student_logits, targets)
    scaled = student_logits / temperature  # (N, V)
    if variant == "renormalized":
        log_q = torch.log_softmax(scaled.gather(-1, targets.ids), dim=-1)  # (N, k)
        log_p = torch.log_softmax(targets.logprobs.to(log_q.dtype) / temperature, dim=-1)
        return log_p, log_q
    student_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (N, 1)
    log_q_kept = scaled.gather(-1, targets.ids) - student_norm  # (N, k)
    log_p_kept = targets.teacher_logprobs(temperature).to(log_q_kept.dtype)  # (N, k)
    if targets.ids.shape[-1] >= student_logits.shape[-1]:
        return log_p_kept, log_q_kept  # k = V: no tail
    p_tail = (-torch.expm1(torch.logsumexp(log_p_kept, dim=-1))).clamp_min(_TAIL_FLOOR)  # (N,)
    tail_logits = scaled.scatter(-1, targets.ids, float("-inf"))  # (N, V), kept ids removed
    log_q_tail = torch.logsumexp(tail_logits, dim=-1) - student_norm.squeeze(-1)  # (N,)
    log_p = torch.cat([log_p_kept, p_tail.log()[:, None]], dim=-1)  # (N, k + 1)
    log_q = torch.cat([log_q_kept, log_q_tail[:, None]], dim=-1)  # (N, k + 1)
    return log_p, log_q


def sparse_divergence(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    variant: SparseVariant = "tail_bucket",
) -> torch.Tensor:
    """Sum over rows of ``divergence`` between the teacher's and the student's coarse outcome
    distributions (see :func:`sparse_outcome_logprobs`): ``forward_kl`` KL(p || q),
    ``reverse_kl`` KL(q || p), ``jsd`` beta KL(p || m) + (1 - beta) KL(q || m) with
    m = beta p + (1 - beta) q. Forward KL is exactly :func:`tail_bucket_kl` /
    :func:`renormalized_topk_kl` (those are called for it)."""
    if divergence not in SPARSE_DIVERGENCES:
        raise ValueError(
            f"divergence={divergence!r}: sparse targets support {', '.join(SPARSE_DIVERGENCES)}"
        )
    if divergence == "forward_kl":
        return _SPARSE_KL[variant](student_logits, targets, temperature=temperature)
    log_p, log_q = sparse_outcome_logprobs(
        student_logits, targets, temperature=temperature, variant=variant
    )
    if divergence == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum()
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    teacher_side = (log_p.exp() * (log_p - log_m)).sum()
    student_side = (log_q.exp() * (log_q - log_m)).sum()
    return beta * teacher_side + (1.0 - beta) * student_side


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    variant: SparseVariant = "tail_bucket",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> LossTerms:
    """``alpha * CE + (1 - alpha) * T^2 * sparse D``, summed; the sparse twin of
    ``distillation_loss`` (``D`` = :func:`sparse_divergence`'s ``divergence``). Shapes:
    ``student_logits`` ``[N, V]``, ``targets`` rows ``[N, k]``, ``labels`` ``[N]``; rows whose
    label is ``ignore_index`` contribute nothing."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if variant not in _SPARSE_KL:
        raise ValueError(f"variant must be one of {sorted(_SPARSE_KL)}, got {variant!r}")
    keep = labels != ignore_index
    student_rows = student_logits[keep]  # (n, V)
    ce_sum = hard_cross_entropy(student_rows, labels[keep])
    if alpha == 1.0:
        kl_sum = student_rows.new_zeros(())
    else:
        kl_sum = sparse_divergence(
            student_rows,
            targets.select(keep),
            divergence=divergence,
            temperature=temperature,
            beta=beta,
            variant=variant,
        )
    loss_sum = alpha * ce_sum + (1.0 - alpha) * temperature**2 * kl_sum
    return LossTerms(loss_sum, ce_sum, kl_sum, int(keep.sum()))


def soft_target_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor | SparseTargets | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    sparse: SparseVariant = "tail_bucket",
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> LossTerms:
    """The KD loss for whatever a teacher gave: full logits ``[..., V]``, sparse top-k, or None.

    ``student_logits`` ``[N, V]`` and ``labels`` ``[N]``; the targets' leading dims are
    flattened to ``N`` rows here, so the training loop never looks at what kind it got.
    """
    if isinstance(targets, SparseTargets):
        return sparse_distillation_loss(
            student_logits,
            targets.rows(),
            labels,
            temperature=temperature,
            alpha=alpha,
            variant=sparse,
            divergence=divergence,
            beta=beta,
        )
    vocab = student_logits.shape[-1]
    return distillation_loss(
        student_logits,
        None if targets is None else targets.reshape(-1, vocab),  # (N, V)
        labels,
        temperature=temperature,
        alpha=alpha,
    )
