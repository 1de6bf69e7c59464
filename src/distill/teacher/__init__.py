"""Teachers: anything that gives soft targets for a batch of token ids.

The training loop only sees the :class:`Teacher` protocol, so a live model and an on-disk cache
are interchangeable.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from distill.teacher.live import LiveTeacher

__all__ = ["Teacher", "LiveTeacher"]


@runtime_checkable
class Teacher(Protocol):
    vocab_rows: int

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits ``[B, T, V]`` (float32) for ``input_ids`` ``[B, T]``, without gradients."""
        ...
