"""Distillation losses: pure functions returning sums over unmasked tokens."""

from distill.losses.functional import (
    IGNORE_INDEX,
    LossTerms,
    distillation_loss,
    forward_kl,
    hard_cross_entropy,
)

__all__ = ["IGNORE_INDEX", "LossTerms", "distillation_loss", "forward_kl", "hard_cross_entropy"]
