"""Several sources in one run (``data.sources``): each with its own format and held-out split,
and training batches that draw each row's source by weight.

The draw is a pure function of the seed and the batch count, and each source keeps its own
epoch order and cursor, so a position restores exactly from ``state_dict`` (checkpoint resume).
"""

from __future__ import annotations

import torch

from distill.data.blocks import BlockBatches, batch_order
from distill.data.examples import Batch, Examples
from distill.errors import DataError

__all__ = ["WeightedBatches", "WeightedExampleBatches", "passes_per_source"]


def passes_per_source(rows_drawn: int, source_rows: list[int], weights: list[float]) -> list[float]:
    """Expected passes over each source's training rows when ``rows_drawn`` rows are drawn by
    ``weights`` (as :class:`WeightedBatches` draws them): a small source of large weight is
    repeated far more often than the total row count suggests."""
    if len(source_rows) != len(weights) or not weights:
        raise DataError("data.sources: one weight per source, at least one source")
    total = sum(weights)
    return [
        rows_drawn * weight / total / max(rows, 1)
        for rows, weight in zip(source_rows, weights, strict=True)
    ]


class WeightedBatches(BlockBatches):
    """Yields ``[batch_size, block_size]`` micro-batches forever from several block sets
    (``parts``), each row's set drawn with probability ``weight / sum(weights)``; within a set,
    rows follow that set's shuffled epochs (as :class:`BlockBatches`). ``blocks`` is every set
    concatenated (the warm-up batch, calibration). ``teachers``: each block of ``blocks``' teacher
    route (several teachers), drawn with it as :class:`BlockBatches` does."""

    def __init__(
        self,
        parts: list[torch.Tensor],
        weights: list[float],
        batch_size: int,
        seed: int,
        teachers: torch.Tensor | None = None,
    ):
        if len(parts) != len(weights) or not parts:
            raise DataError("data.sources: one weight per source, at least one source")
        self.parts = parts
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.offsets = [0]
        for part in parts[:-1]:
            self.offsets.append(self.offsets[-1] + part.shape[0])
        super().__init__(torch.cat(parts), batch_size, seed, teachers)
        self.draws = 0
        self.positions = [[0, 0] for _ in parts]  # per source: epoch, cursor
        self._orders = [
            batch_order(p.shape[0], seed + 7919 * (i + 1), 0) for i, p in enumerate(parts)
        ]

    def _source_order(self, source: int, epoch: int) -> torch.Tensor:
        return batch_order(self.parts[source].shape[0], self.seed + 7919 * (source + 1), epoch)

    def _next_indices(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 * self.draws + 1)
        self.draws += 1
        sources = torch.multinomial(self.weights, self.batch_size, True, generator=generator)
        rows = []
        for source in sources.tolist():
            position = self.positions[source]
            if position[1] >= len(self._orders[source]):
                position[0] += 1
                position[1] = 0
                self._orders[source] = self._source_order(source, position[0])
            rows.append(self.offsets[source] + int(self._orders[source][position[1]]))
            position[1] += 1
        return torch.tensor(rows, dtype=torch.long)

    def source_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The source index of each row index into ``blocks``."""
        return torch.bucketize(rows, torch.tensor(self.offsets[1:]), right=True)

    def state_dict(self) -> dict:
        return {"draws": self.draws, "positions": [list(p) for p in self.positions]}

    def load_state_dict(self, state: dict) -> None:
        self.draws = state["draws"]
        self.positions = [list(p) for p in state["positions"]]
        self._orders = [self._source_order(i, p[0]) for i, p in enumerate(self.positions)]


class WeightedExampleBatches(WeightedBatches):
    """:class:`WeightedBatches` over sources encoded as :class:`Examples` (chat, prompt-response
    and packed text rows together): yields :class:`Batch` es cut to the longest row drawn, as
    :class:`~distill.data.examples.ExampleBatches` does; routes are the examples' own."""

    def __init__(self, parts: list[Examples], weights: list[float], batch_size: int, seed: int):
        self.examples = Examples.cat(parts)
        super().__init__(
            [part.input_ids for part in parts], weights, batch_size, seed, self.examples.teachers
        )

    def next_batch(self) -> Batch:  # type: ignore[override]
        drawn = self.examples.select(self._next_indices())
        width = int(drawn.lengths.max())
        return Batch(
            drawn.input_ids[:, :width],
            drawn.labels[:, :width],
            drawn.prompt_lengths,
            drawn.teachers,
        )
