"""Training examples with their own targets: chat ``messages`` rows (assistant tokens are the
targets) and ``prompt``/``response`` rows (response tokens are); the batches the loop draws.

Every example is one row of ``[N, block_size]`` tensors, right-padded: with causal attention the
padding after a sequence cannot change its logits, so no attention mask is needed, and padded
positions are never targets. A :class:`Batch` carries the next-token ``labels`` (``IGNORE_INDEX``
where no target), each row's prompt length (where on-policy sampling starts) and, with several
teachers (``teachers:``), each row's teacher route.
"""

from __future__ import annotations

import json
import logging
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from distill.data.blocks import BlockBatches
from distill.data.chat import check_messages, render_chat, require_chat_template
from distill.data.corpus import split_documents
from distill.data.routing import Routing
from distill.errors import DataError
from distill.io import jsonl_objects, text_lines
from distill.losses import IGNORE_INDEX

__all__ = [
    "Batch",
    "Examples",
    "ExampleBatches",
    "detect_format",
    "encode_examples",
    "read_rows",
    "split_rows",
    "targets_from_mask",
]

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """A micro-batch: ``input_ids`` and ``labels`` ``[B, T]``, ``prompt_lengths`` ``[B]`` and,
    with several teachers, ``teachers`` ``[B]`` (each row's route; None: one teacher)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: torch.Tensor
    teachers: torch.Tensor | None = None

    @classmethod
    def from_blocks(
        cls, blocks: torch.Tensor, prompt_tokens: int, teachers: torch.Tensor | None = None
    ) -> Batch:
        """Packed text: every next token is a target; the prompt is the first ``prompt_tokens``."""
        labels = torch.full_like(blocks, IGNORE_INDEX)
        labels[:, :-1] = blocks[:, 1:]
        lengths = torch.full((blocks.shape[0],), min(prompt_tokens, blocks.shape[1] - 1))
        return cls(blocks, labels, lengths, teachers)

    def rows(self, start: int, stop: int) -> Batch:
        teachers = None if self.teachers is None else self.teachers[start:stop]
        return Batch(
            self.input_ids[start:stop],
            self.labels[start:stop],
            self.prompt_lengths[start:stop],
            teachers,
        )

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class Examples:
    """Encoded examples: ``input_ids``/``labels`` ``[N, T]``, ``lengths``/``prompt_lengths`` ``[N]``
    and, with several teachers, ``teachers`` ``[N]`` (each row's route)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    teachers: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def head(self, n: int) -> Examples:
        """The first ``n`` examples."""
        return self.select(torch.arange(min(n, len(self))))

    def select(self, rows: torch.Tensor) -> Examples:
        """The examples at ``rows`` (indices), in that order."""
        teachers = None if self.teachers is None else self.teachers[rows]
        return Examples(
            self.input_ids[rows],
            self.labels[rows],
            self.lengths[rows],
            self.prompt_lengths[rows],
            teachers,
        )

    @classmethod
    def from_blocks(
        cls, blocks: torch.Tensor, prompt_length: int, teachers: torch.Tensor | None = None
    ) -> Examples:
        """Packed text blocks ``[n, T]`` as examples (every next token a target, as
        :meth:`Batch.from_blocks`; the first ``prompt_length`` tokens the prompt), so they can
        be batched with chat / prompt-response rows (``data.sources`` of several formats)."""
        n, width = blocks.shape
        labels = torch.full_like(blocks, IGNORE_INDEX)
        labels[:, :-1] = blocks[:, 1:]
        lengths = torch.full((n,), width)
        return cls(
            blocks, labels, lengths, torch.full((n,), min(prompt_length, width - 1)), teachers
        )

    @classmethod
    def cat(cls, parts: list[Examples]) -> Examples:
        """The examples of every part, in order (teacher routes kept if every part has them)."""
        routed = all(part.teachers is not None for part in parts)
        return cls(
            torch.cat([part.input_ids for part in parts]),
            torch.cat([part.labels for part in parts]),
            torch.cat([part.lengths for part in parts]),
            torch.cat([part.prompt_lengths for part in parts]),
            torch.cat([part.teachers for part in parts]) if routed else None,
        )


def read_rows(path: str | Path) -> list[dict]:
    """The JSON objects of a .jsonl file (blank lines skipped), or a DataError naming file:line."""
    file = Path(path)
    if file.suffix != ".jsonl" or not file.is_file():
        raise DataError(f"data.path {file}: chat and prompt/response data must be a .jsonl file")
    rows = [row for _, row in jsonl_objects(file)]
    if not rows:
        raise DataError(f"data.path {file}: no rows")
    return rows


def detect_format(path: str | Path | None, requested: str) -> str:
    """``text``, ``chat`` or ``prompt_response``: ``requested`` unless ``auto`` (then the first
    row of a .jsonl decides)."""
    if requested != "auto":
        return requested
    if path is None or Path(path).suffix != ".jsonl" or not Path(path).is_file():
        return "text"
    with closing(text_lines(path)) as lines:  # the first non-blank line only
        first = next((line for line in lines if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return "text"  # the text reader names the bad line
    if isinstance(row, dict) and "messages" in row:
        return "chat"
    if isinstance(row, dict) and "prompt" in row and "response" in row:
        return "prompt_response"
    return "text"


def split_rows(rows: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, heldout) rows, held-out ones chosen by content hash (as whole documents are)."""
    texts = [json.dumps(row, sort_keys=True, ensure_ascii=False) for row in rows]
    train, heldout = split_documents(texts, heldout_fraction)
    return [json.loads(text) for text in train], [json.loads(text) for text in heldout]


def targets_from_mask(input_ids: list[int], is_target: list[bool]) -> list[int]:
    """Next-token labels: ``labels[t] = input_ids[t + 1]`` where token ``t + 1`` is a target."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for t in range(len(input_ids) - 1):
        if is_target[t + 1]:
            labels[t] = input_ids[t + 1]
    return labels


def _prompt_response_tokens(
    tokenizer: PreTrainedTokenizerBase, row: dict, where: str
) -> tuple[list[int], list[bool]]:
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{where}: expected text fields `prompt` and `response`")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and row.get("finished", True) is not False:
        response_ids.append(tokenizer.eos_token_id)
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def encode_examples(
    rows: list[dict],
    data_format: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    source: str,
    routing: Routing | None = None,
) -> Examples:
    """Tokenise rows into right-padded ``[N, block_size]`` examples; longer ones are cut. With
    ``routing``, each kept row's teacher route (its ``teacher`` field) is kept too.

    A row with ``"finished": false`` (an answer cut at ``max_new_tokens`` by ``distill
    generate``) gets no end-of-turn / EOS target. Rows left without a target once cut (a prompt of ``block_size`` tokens or more, or a chat
    without an assistant turn) are dropped with a warning; none left is a DataError.
    """
    if data_format == "chat":
        require_chat_template(tokenizer, source)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences: list[tuple[list[int], list[int], int]] = []
    routes: list[int] = []
    for index, row in enumerate(rows):
        where = f"{source} row {index + 1}"
        route = routing.of_row(row, where) if routing is not None else 0
        if data_format == "chat":
            messages = check_messages(row.get("messages"), where)
            finished = row.get("finished", True) is not False
            input_ids, is_target = render_chat(tokenizer, messages, where, finished)
        else:
            input_ids, is_target = _prompt_response_tokens(tokenizer, row, where)
        input_ids, is_target = input_ids[:block_size], is_target[:block_size]
        labels = targets_from_mask(input_ids, is_target)
        first_target = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first_target is None:
            continue
        sequences.append((input_ids, labels, first_target + 1))
        routes.append(route)
    if len(sequences) < len(rows):
        log.warning(
            "%s: %d of %d rows have no target token within data.block_size=%d; dropped",
            source,
            len(rows) - len(sequences),
            len(rows),
            block_size,
        )
    if not sequences:
        raise DataError(
            f"{source}: no row has a target token within data.block_size={block_size} "
            f"(format {data_format}: chat rows need an assistant turn, prompt_response rows a "
            "response)"
        )
    input_ids = torch.full((len(sequences), block_size), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), block_size), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels, _) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
    lengths = torch.tensor([len(ids) for ids, _, _ in sequences])
    prompt_lengths = torch.tensor([prompt for _, _, prompt in sequences])
    teachers = torch.tensor(routes) if routing is not None else None
    return Examples(input_ids, labels, lengths, prompt_lengths, teachers)


class ExampleBatches(BlockBatches):
    """:class:`BlockBatches` over encoded examples: yields :class:`Batch` es cut to the longest
    row of the batch (the columns after it are padding only)."""

    def __init__(self, examples: Examples, batch_size: int, seed: int):
        super().__init__(examples.input_ids, batch_size, seed, examples.teachers)
        self.examples = examples

    def next_batch(self) -> Batch:  # type: ignore[override]
        indices = self._next_indices()
        width = int(self.examples.lengths[indices].max())
        teachers = self.examples.teachers
        return Batch(
            self.examples.input_ids[indices, :width],
            self.examples.labels[indices, :width],
            self.examples.prompt_lengths[indices],
            None if teachers is None else teachers[indices],
        )
