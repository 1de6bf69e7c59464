"""Intermediate-layer distillation losses: pure functions returning ``(sum, n_rows)``.

- :func:`hidden_state_loss`: per token MSE (mean over channels) or 1 - cosine between a student
  layer's hidden states and its teacher layer's (same width: project the student first);
- :func:`attention_kl`: KL(teacher || student) between attention distributions, per query row,
  averaged over heads (MiniLM / TinyBERT; needs equal head counts);
- :func:`value_relation_kl`: the same KL between value-relation matrices
  softmax(V_r V_r^T / sqrt(d_r)) of ``relation_heads`` slices of the concatenated values
  (MiniLMv2), which exist for any head count.

Sums run over rows (tokens / query positions) so the loop can normalise them like the logit loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["hidden_state_loss", "attention_kl", "value_relation_kl", "relations"]


def hidden_state_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, kind: Literal["mse", "cosine"] = "mse"
) -> tuple[torch.Tensor, int]:
    """Summed per-token loss between ``student`` and ``teacher`` ``[..., H]`` (same width)."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}: hidden states "
            "must have the same shape (project the student to the teacher's width)"
        )
    s = student.reshape(-1, student.shape[-1]).float()  # (N, H)
    t = teacher.reshape(-1, teacher.shape[-1]).float()  # (N, H)
    if kind == "mse":
        per_token = (s - t).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"kind={kind!r}: expected 'mse' or 'cosine'")
    return per_token.sum(), s.shape[0]


def _row_kl(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the last dim; 0 log 0 = 0 (masked future keys)."""
    return (
        torch.xlogy(teacher_probs, teacher_probs)
        - torch.xlogy(teacher_probs, student_probs.clamp_min(1e-30))
    ).sum(dim=-1)


def attention_kl(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, query_rows: int | None = None
) -> tuple[torch.Tensor, int]:
    """Summed over batch and query rows, mean over heads: KL between attention distributions.

    ``student_probs`` / ``teacher_probs`` ``[B, heads, T, T]`` (rows sum to 1); only the first
    ``query_rows`` query positions count (default all).
    """
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"student {tuple(student_probs.shape)} and teacher {tuple(teacher_probs.shape)}: "
            "attention_kl needs equal head counts (use value_relation_kl otherwise)"
        )
    rows = query_rows or student_probs.shape[2]
    kl = _row_kl(teacher_probs[:, :, :rows].float(), student_probs[:, :, :rows].float())  # (B,h,R)
    return kl.mean(dim=1).sum(), kl.shape[0] * rows


def relations(states: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """Causal self-relation distributions ``[B, r, T, T]`` of ``states`` ``[B, T, D]``."""
    batch, length, width = states.shape
    if width % relation_heads:
        raise ValueError(f"relation_heads={relation_heads}: must divide the width {width}")
    d = width // relation_heads
    split = states.float().view(batch, length, relation_heads, d).transpose(1, 2)  # (B, r, T, d)
    scores = split @ split.transpose(-1, -2) / d**0.5  # (B, r, T, T)
    future = torch.ones(length, length, dtype=torch.bool, device=states.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def value_relation_kl(
    student_values: torch.Tensor,
    teacher_values: torch.Tensor,
    relation_heads: int,
    query_rows: int | None = None,
) -> tuple[torch.Tensor, int]:
    """MiniLMv2 value-relation KL, summed over batch and query rows, mean over relation heads.

    ``student_values`` ``[B, T, Ds]`` and ``teacher_values`` ``[B, T, Dt]``: each layer's value
    projections of all heads, concatenated; ``relation_heads`` must divide ``Ds`` and ``Dt``.
    """
    if relation_heads < 1:
        raise ValueError(f"relation_heads={relation_heads}: must be at least 1")
    student_rel = relations(student_values, relation_heads)
    teacher_rel = relations(teacher_values, relation_heads)
    return attention_kl(student_rel, teacher_rel, query_rows)
