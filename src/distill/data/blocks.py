"""Tokenising documents and packing them into fixed-length blocks; a deterministic batch order."""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from distill.errors import DataError

__all__ = ["pack_documents", "batch_order", "BlockBatches", "RoutedBlocks"]


def pack_documents(
    documents: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> torch.Tensor:
    """All documents tokenised, each followed by EOS, concatenated and cut into ``[n, block_size]``.

    The last partial block is dropped. Every token of a block is a training target.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        stream.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(
            f"data holds {len(stream)} tokens, fewer than one block of data.block_size={block_size}"
        )
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(
        n_blocks, block_size
    )


def batch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of block indices that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=generator)


class RoutedBlocks(NamedTuple):
    """Packed blocks ``[B, T]`` drawn with each one's teacher route ``[B]`` (several teachers)."""

    blocks: torch.Tensor
    teachers: torch.Tensor


class BlockBatches:
    """Yields ``[batch_size, block_size]`` micro-batches forever, epoch after epoch.

    The order is a pure function of ``seed`` and the position, so the same config sees the same
    data at the same step, and a position can be restored from ``state_dict``. With
    ``teachers`` (each block's teacher route ``[n]``), each micro-batch is a
    :class:`RoutedBlocks`; the order does not depend on it.
    """

    def __init__(
        self,
        blocks: torch.Tensor,
        batch_size: int,
        seed: int,
        teachers: torch.Tensor | None = None,
    ):
        if batch_size > blocks.shape[0]:
            raise DataError(
                f"train.batch_size={batch_size} exceeds the {blocks.shape[0]} training blocks"
            )
        if teachers is not None and teachers.shape != blocks.shape[:1]:
            raise ValueError(f"teachers {tuple(teachers.shape)}: one route per block expected")
        self.blocks = blocks
        self.teachers = teachers
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = batch_order(blocks.shape[0], seed, 0)

    def next_batch(self) -> torch.Tensor | RoutedBlocks:
        indices = self._next_indices()
        if self.teachers is None:
            return self.blocks[indices]
        return RoutedBlocks(self.blocks[indices], self.teachers[indices])

    def _next_indices(self) -> torch.Tensor:
        """The next ``batch_size`` row indices, starting a new epoch's order when one runs out."""
        if self.cursor + self.batch_size > len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = batch_order(self.blocks.shape[0], self.seed, self.epoch)
        indices = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.cursor = state["cursor"]
        self._order = batch_order(self.blocks.shape[0], self.seed, self.epoch)
