"""Schedules for loss hyper-parameters (temperature, alpha) over the optimizer steps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch

from distill.losses.functional import LossTerms, distillation_loss

if TYPE_CHECKING:
    from distill.config import LossConfig

__all__ = [
    "ScheduleKind",
    "scheduled_alpha_temperature",
    "scheduled_distillation_loss",
    "scheduled_value",
]

ScheduleKind = Literal["constant", "linear", "cosine"]


def scheduled_value(
    kind: ScheduleKind, start: float, end: float | None, step: int, total_steps: int
) -> float:
    """The value at optimizer step ``step`` (0-based) of ``total_steps``.

    ``constant``: ``start`` throughout. ``linear``: ``start`` at step 0 to ``end`` at the last
    step. ``cosine``: the same ends, ``end + (start - end) * (1 + cos(pi * progress)) / 2``, slow
    near both. ``end=None`` means ``end = start``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step must be in [0, {total_steps}), got {step}")
    if end is None or kind == "constant" or total_steps == 1:
        return start
    progress = step / (total_steps - 1)
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"kind must be constant, linear or cosine, got {kind!r}")


def scheduled_alpha_temperature(
    loss: LossConfig, step: int, total_steps: int
) -> tuple[float, float]:
    """``(alpha, temperature)`` of ``loss``'s schedules at optimizer step ``step`` (0-based)."""
    alpha = scheduled_value(loss.alpha_schedule, loss.alpha, loss.alpha_end, step, total_steps)
    temperature = scheduled_value(
        loss.temperature_schedule, loss.temperature, loss.temperature_end, step, total_steps
    )
    return alpha, temperature


def scheduled_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    loss: LossConfig,
    step: int,
    total_steps: int,
    *,
    labels_only: bool = False,
) -> LossTerms:
    """:func:`~distill.losses.distillation_loss` with every knob of ``loss``: divergence, beta,
    skew, scale_by_t2, and temperature / alpha at optimizer step ``step`` of their schedules.
    ``labels_only`` forces alpha = 1 (the labels-only baseline). Shapes ``[N, C]``, ``[N]``."""
    alpha, temperature = scheduled_alpha_temperature(loss, step, total_steps)
    return distillation_loss(
        student_logits,
        teacher_logits,
        labels,
        temperature=temperature,
        alpha=1.0 if labels_only else alpha,
        divergence=loss.divergence,
        beta=loss.beta,
        skew=loss.skew,
        scale_by_t2=loss.scale_by_t2,
    )
