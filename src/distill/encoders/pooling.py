"""Pooling token states into sentence embeddings, and batched encoding of texts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.encoders.models import Pooling

__all__ = ["pool", "embed_batch", "encode", "tokenize"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """``[B, T, H]`` token states -> ``[B, H]``: mean over non-padding tokens, or the first token."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"mode: expected 'mean' or 'cls', got {mode!r}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Padded, truncated ``input_ids``/``attention_mask`` (and ``token_type_ids``) ``[B, T]``."""
    return dict(
        tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


def embed_batch(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], pooling: Pooling
) -> torch.Tensor:
    """Pooled embeddings ``[B, H]`` *before* normalisation (what the losses compare)."""
    inputs = {
        k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    hidden = model(**inputs).last_hidden_state  # (B, T, H)
    return pool(hidden, batch["attention_mask"], pooling.mode)


@torch.no_grad()
def encode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    pooling: Pooling,
    *,
    max_length: int = 128,
    batch_size: int = 64,
) -> torch.Tensor:
    """Sentence embeddings ``[len(texts), H]``, L2-normalised when ``pooling.normalize``."""
    model.eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[start : start + batch_size], max_length)
        chunks.append(embed_batch(model, batch, pooling))
    embeddings = torch.cat(chunks)
    return F.normalize(embeddings, dim=-1) if pooling.normalize else embeddings
