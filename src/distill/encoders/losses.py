"""Encoder-specific distillation losses, as sums over sentences (the loop divides by the count).

Logit losses come from :mod:`distill.losses`; these compare pooled embeddings, in-batch
similarity structure, and intermediate layers of a layer-dropped student with the teacher layers
it was copied from. Every function returns a 0-d tensor summed over the ``B`` sentences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embedding_mse", "embedding_cosine", "relational", "hidden_mse", "attention_kl"]


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over sentences of the mean over dimensions of ``(s - t)^2``; shapes ``[B, H]``."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"student embeddings {tuple(student.shape)} != teacher {tuple(teacher.shape)}"
        )
    return (student - teacher).pow(2).mean(-1).sum()


def embedding_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over sentences of ``1 - cos(s, t)``; shapes ``[B, H]``."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).sum()


def relational(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over sentences i of ``mean_j (cos(s_i, s_j) - cos(t_i, t_j))^2`` within the batch.

    Matches the similarity structure, not the vectors, so the widths may differ. Depends on
    which sentences share a micro-batch.
    """
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher, dim=-1)
    return (s @ s.T - t @ t.T).pow(2).mean(-1).sum()  # (B, B) -> (B,) -> ()


def _token_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` weights that average over each sentence's real tokens."""
    mask = attention_mask.float()
    return mask / mask.sum(-1, keepdim=True).clamp(min=1.0)


def hidden_mse(
    student_states: list[torch.Tensor],
    teacher_states: list[torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum over sentences of the mean over layer pairs and real tokens of the per-dimension MSE.

    ``student_states[k]`` and ``teacher_states[k]`` are ``[B, T, H]`` outputs of paired layers.
    """
    weights = _token_weights(attention_mask)  # (B, T)
    total = attention_mask.new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states, teacher_states, strict=True):
        total = total + ((s - t).pow(2).mean(-1) * weights).sum()  # (B, T) -> ()
    return total / len(student_states)


def attention_kl(
    student_maps: list[torch.Tensor],
    teacher_maps: list[torch.Tensor],
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum over sentences of the mean over layer pairs, heads and real query tokens of
    KL(teacher attention row || student attention row).

    Maps are ``[B, heads, T, T]`` probabilities; padded keys carry (near) zero mass in both.
    """
    weights = _token_weights(attention_mask)  # (B, T) over queries
    total = attention_mask.new_zeros((), dtype=torch.float32)
    for s, t in zip(student_maps, teacher_maps, strict=True):
        # (B, heads, T_q): KL of each query row, 0 * log 0 treated as 0
        row_kl = torch.where(t > 0, t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log()), 0)
        per_query = row_kl.sum(-1).mean(1)  # (B, T_q)
        total = total + (per_query * weights).sum()
    return total / len(student_maps)
