"""Held-out sets of another kind than the training data (``eval.extra_data``).

A run's own held-out blocks come from the training corpus, so a student that fits that corpus
can look good on them while drifting from the teacher elsewhere. Every causal-LM run therefore
also scores its models on at least one more set, never trained on: by default the shipped
``files/other_domain.txt`` (English prose of other genres: a story, a recipe, travel notes, a
letter, news items, dialogues; written by hand for distill), plain text any tokenizer reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from distill.config import SHIPPED_DATA
from distill.data.blocks import pack_documents
from distill.data.corpus import DOCUMENT_SUFFIXES, data_files, read_documents
from distill.errors import DataError

__all__ = ["OTHER_DOMAIN", "extra_sources", "extra_blocks", "spread"]

OTHER_DOMAIN = "other_domain"


def _shipped() -> Path:
    return SHIPPED_DATA / f"{OTHER_DOMAIN}.txt"


def extra_sources(paths: list[str] | None) -> dict[str, Path]:
    """``{set name: path}``: ``None`` = the shipped other-domain text; names are the file stems
    (made unique with ``_2``, ``_3``, ...); a missing path or a file of another kind is a
    :class:`~distill.errors.DataError`."""
    if paths is None:
        return {OTHER_DOMAIN: _shipped()}
    sources: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"eval.extra_data: {path} does not exist")
        data_files(path, DOCUMENT_SUFFIXES)  # refuses another kind of file, an empty directory
        name, n = path.stem or "extra", 1
        while name in sources or name == "heldout":
            n += 1
            name = f"{path.stem}_{n}"
        sources[name] = path
    return sources


def spread(blocks: torch.Tensor, keep: int) -> torch.Tensor:
    """``keep`` rows of ``blocks`` evenly spaced from first to last (all rows if fewer), so a
    small sample still spans every part (every genre) of a set."""
    n = blocks.shape[0]
    if n <= keep:
        return blocks
    index = torch.linspace(0, n - 1, keep).round().long()
    return blocks[index]


def extra_blocks(
    paths: list[str] | None,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int,
    text_field: str = "text",
) -> dict[str, torch.Tensor]:
    """``{set name: [n <= max_blocks, block_size]}`` packed blocks of each extra held-out set."""
    return {
        name: spread(
            pack_documents(read_documents(path, text_field), tokenizer, block_size), max_blocks
        )
        for name, path in extra_sources(paths).items()
    }
