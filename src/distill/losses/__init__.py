"""Distillation losses: pure functions returning sums over unmasked tokens.

``functional`` holds the unfused objective on full logits, ``divergences`` the per-row math it
shares with ``fused`` (the chunked path that never builds the student's logits), ``schedule`` the
temperature / alpha schedules, ``sparse`` the losses on a teacher's cached top-k.
"""

from distill.losses.divergences import DIVERGENCES
from distill.losses.functional import (
    IGNORE_INDEX,
    LossSpec,
    LossTerms,
    distillation_loss,
    forward_kl,
    hard_cross_entropy,
    jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    soft_divergence,
    total_variation,
)
from distill.losses.fused import auto_chunk_size, chunk_buffers, fused_distillation_loss
from distill.losses.schedule import scheduled_value

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "LossSpec",
    "LossTerms",
    "auto_chunk_size",
    "chunk_buffers",
    "distillation_loss",
    "forward_kl",
    "fused_distillation_loss",
    "hard_cross_entropy",
    "jsd",
    "reverse_kl",
    "scheduled_value",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_divergence",
    "total_variation",
]
