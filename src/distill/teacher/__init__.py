"""Teachers: anything that gives soft targets for a batch of token ids.

The training loop only sees the :class:`Teacher` protocol, so a live model, an on-disk cache and a
served teacher (over HTTP) are interchangeable; a :class:`TeacherSet` holds several named ones,
each row of a batch routed to its own.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from distill.losses.sparse import SparseTargets
from distill.teacher.cache import CachedTeacher
from distill.teacher.live import LiveTeacher
from distill.teacher.remote import RemoteTeacher
from distill.teacher.routed import NamedTeacher, TeacherSet

__all__ = [
    "Teacher",
    "LiveTeacher",
    "CachedTeacher",
    "RemoteTeacher",
    "NamedTeacher",
    "TeacherSet",
    "SparseTargets",
]


@runtime_checkable
class Teacher(Protocol):
    vocab_rows: int

    def soft_targets(self, input_ids: torch.Tensor) -> torch.Tensor | SparseTargets:
        """Soft targets for ``input_ids`` ``[B, T]``, without gradients: full float32 logits
        ``[B, T, V]`` (a live model) or the top-k :class:`SparseTargets` (a cache, a server);
        ``distill.losses.sparse.soft_target_loss`` takes either."""
        ...
