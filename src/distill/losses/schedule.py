"""The loss settings of one optimizer step: the ``loss`` config with its temperature and alpha
schedules applied, as one frozen :class:`LossSettings`."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from distill.losses.fused import DEFAULT_MEMORY_BUDGET_MB
from distill.losses.sparse import SparseVariant

if TYPE_CHECKING:
    from distill.config import LossConfig

__all__ = ["LossSchedule", "LossSettings", "ScheduleKind", "loss_settings", "scheduled_value"]

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


@dataclass(frozen=True)
class LossSettings:
    """Every knob of one optimizer step's loss: ``loss`` config values with the alpha and
    temperature schedules applied. Built once per step by :func:`loss_settings` and passed whole
    down to :mod:`distill.losses.objective`, which unpacks it for the pure loss functions."""

    temperature: float
    alpha: float
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    scale_by_t2: bool = True
    fused: bool = True
    chunk_size: int = 0
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB
    sparse: SparseVariant = "tail_bucket"
    cross_tokenizer: str | None = None
    uld_top_k: int = 256

    def with_alpha(self, alpha: float) -> LossSettings:
        """The same settings with another alpha (on-policy batches: 0; labels only: 1)."""
        return replace(self, alpha=alpha)


def loss_settings(loss: LossConfig, step: int = 0, total_steps: int = 1) -> LossSettings:
    """``loss``'s settings at optimizer step ``step`` (0-based) of ``total_steps``."""
    return LossSettings(
        temperature=scheduled_value(
            loss.temperature_schedule, loss.temperature, loss.temperature_end, step, total_steps
        ),
        alpha=scheduled_value(loss.alpha_schedule, loss.alpha, loss.alpha_end, step, total_steps),
        divergence=loss.divergence,
        beta=loss.beta,
        skew=loss.skew,
        scale_by_t2=loss.scale_by_t2,
        fused=loss.fused,
        chunk_size=loss.chunk_size,
        memory_budget_mb=loss.memory_budget_mb,
        sparse=loss.sparse,
        cross_tokenizer=loss.cross_tokenizer,
        uld_top_k=loss.uld_top_k,
    )


class LossSchedule:
    """:func:`loss_settings` of one run, built once per optimizer step (micro-batches of the
    same step share it)."""

    def __init__(self, loss: LossConfig, total_steps: int) -> None:
        self.loss = loss
        self.total_steps = total_steps
        self._step: int | None = None
        self._settings: LossSettings | None = None

    def at(self, step: int) -> LossSettings:
        if step != self._step:
            self._step, self._settings = step, loss_settings(self.loss, step, self.total_steps)
        return self._settings
