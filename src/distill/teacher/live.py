"""A live teacher: a frozen Hugging Face model run under ``no_grad`` on each batch."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

__all__ = ["LiveTeacher"]


class LiveTeacher:
    """Wraps a causal LM in eval mode, frozen; returns float32 logits for the shared vocab rows."""

    def __init__(self, model: PreTrainedModel, vocab_rows: int | None = None):
        self.model = model.eval().requires_grad_(False)
        self.vocab_rows = vocab_rows or model.get_output_embeddings().weight.shape[0]

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits[..., : self.vocab_rows].float()  # (B, T, V)

    def soft_targets(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The :class:`~distill.teacher.Teacher` protocol: full logits ``[B, T, V]``."""
        return self.logits(input_ids)
