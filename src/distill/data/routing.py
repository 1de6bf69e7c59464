"""Several teachers in one run (``teachers:``): which teacher each training row is distilled from.

A .jsonl row (text, chat or prompt/response) may carry a ``teacher`` field naming one of the run's
teachers; a row without it (and every row of a .txt or .parquet file) goes to the default teacher.
A row's route is an index into the run's teacher names. Text documents are packed into blocks per
teacher, so a block never mixes two teachers' rows; with one teacher (every row unrouted) the
blocks are exactly those of :func:`~distill.data.blocks.pack_documents`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from distill.data.blocks import pack_documents
from distill.errors import DataError
from distill.io import jsonl_objects

if TYPE_CHECKING:
    from distill.config import RunConfig

__all__ = ["TEACHER_FIELD", "Routing", "check_routes", "pack_routed"]

TEACHER_FIELD = "teacher"


@dataclass(frozen=True)
class Routing:
    """The run's teacher ``names`` (route ``i`` = ``names[i]``) and the one for unrouted rows."""

    names: tuple[str, ...]
    default: str

    @classmethod
    def from_config(cls, config: RunConfig) -> Routing | None:
        """The routing of ``config.teachers``; None for a run with one teacher."""
        if config.teachers is None:
            return None
        names = tuple(entry.name for entry in config.teachers)
        return cls(names, config.default_teacher or names[0])

    @property
    def default_index(self) -> int:
        return self.names.index(self.default)

    def index(self, value: Any, where: str) -> int:
        """The route of a row whose ``teacher`` field is ``value`` (None: the default), or a
        :class:`DataError` naming ``where`` (file and line), the value and the names."""
        if value is None:
            return self.default_index
        if not isinstance(value, str) or value not in self.names:
            raise DataError(
                f"{where}: {TEACHER_FIELD} {value!r} is not one of the run's teachers "
                f"({', '.join(self.names)})"
            )
        return self.names.index(value)

    def of_row(self, row: dict[str, Any], where: str) -> int:
        return self.index(row.get(TEACHER_FIELD), where)


def check_routes(files: list[Path], routing: Routing) -> None:
    """Refuse the first .jsonl row of ``files`` whose ``teacher`` is not one of the run's (one
    line naming the file, the line, the value and the names); before any model loads."""
    for file in files:
        if file.suffix != ".jsonl":
            continue
        for line_number, row in jsonl_objects(file):
            routing.of_row(row, f"{file}:{line_number}")


def pack_routed(
    documents: list[str],
    routes: list[int],
    routing: Routing,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``[n, block_size]`` and their routes ``[n]``: each teacher's documents packed on
    their own (as :func:`pack_documents`), teachers in the order of ``routing.names``. A teacher
    whose rows hold less than one block is a :class:`DataError` naming it."""
    blocks, block_routes = [], []
    for index, name in enumerate(routing.names):
        own = [doc for doc, route in zip(documents, routes, strict=True) if route == index]
        if not own:
            continue
        try:
            packed = pack_documents(own, tokenizer, block_size)
        except DataError as err:
            raise DataError(f"teacher {name}: its training rows: {err}") from None
        blocks.append(packed)
        block_routes.append(torch.full((packed.shape[0],), index, dtype=torch.long))
    return torch.cat(blocks), torch.cat(block_routes)
