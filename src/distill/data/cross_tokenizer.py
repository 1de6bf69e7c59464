"""The teacher's side of each training row when teacher and student tokenize differently.

The student's rows are what they are without a teacher (packed blocks, or chat / prompt-response
examples, in the student's tokenization: the student learns its own labels). For each row the
teacher gets the same text in its own tokenization, and both sides' tokens are grouped on bytes
(:func:`distill.data.alignment.align_spans`):

- **Packed text**, aligned per block when drawn: the block's tokens are decoded to bytes; each
  stretch between special tokens is tokenized by the teacher; a special token the teacher has a
  partner for (the EOS between documents) is one shared marker unit, one it has not is width
  zero on the student's side. Leading tokens that start inside a UTF-8 character (the block cut
  one) and trailing ones that end inside one are left out of the teacher's text: no group holds
  them. A stretch whose teacher tokens do not spell its bytes (a normalizer changed them) is
  seen by both sides but forms no group.
- **Chat and prompt-response rows**, aligned once when encoded:
  :mod:`distill.data.cross_examples`.

A group is *scored* when it is predictable on both sides (its first token has a predecessor:
the row whose logits predict it) and every student token in it is a training target. Scored
groups are numbered 0, 1, ... per row, the same numbers on both sides; every other token gets -1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from distill.data.alignment import ByteVocab, Span, align_spans
from distill.data.blocks import BlockBatches
from distill.data.examples import Batch

__all__ = [
    "AlignedRow",
    "CrossBatch",
    "CrossBlockBatches",
    "TokenizerPair",
    "peek",
    "scored_groups",
]


@dataclass
class AlignedRow:
    """One row's teacher tokens and both sides' scored group per token (-1: none)."""

    teacher_ids: list[int]
    student_groups: list[int]
    teacher_groups: list[int]


@dataclass
class CrossBatch:
    """A micro-batch for both tokenizers: the student's :class:`Batch` ``[B, Ts]``, the
    teacher's right-padded ``teacher_ids`` ``[B, Tt]`` and each side's group ids."""

    student: Batch
    teacher_ids: torch.Tensor  # (B, Tt)
    student_groups: torch.Tensor  # (B, Ts)
    teacher_groups: torch.Tensor  # (B, Tt)

    def rows(self, start: int, stop: int) -> CrossBatch:
        return CrossBatch(
            self.student.rows(start, stop),
            self.teacher_ids[start:stop],
            self.student_groups[start:stop],
            self.teacher_groups[start:stop],
        )

    def to(self, device: torch.device) -> CrossBatch:
        student = Batch(
            self.student.input_ids.to(device),
            self.student.labels.to(device),
            self.student.prompt_lengths,
        )
        return CrossBatch(
            student,
            self.teacher_ids.to(device),
            self.student_groups.to(device),
            self.teacher_groups.to(device),
        )

    @property
    def n_targets(self) -> int:
        return self.student.n_targets

    @classmethod
    def labels_only(cls, student: Batch) -> CrossBatch:
        """A student batch with an empty teacher side (labels only: no teacher, no groups)."""
        rows = student.input_ids.shape[0]
        empty = torch.zeros((rows, 1), dtype=torch.long)
        groups = torch.full_like(student.input_ids, -1)
        return cls(student, empty, groups, empty - 1)

    @property
    def n_groups(self) -> int:
        return int((self.student_groups.max(dim=1).values + 1).clamp_min(0).sum())


def scored_groups(
    student_groups: list[int], teacher_groups: list[int], student_targets: list[bool]
) -> tuple[list[int], list[int]]:
    """Renumber groups 0, 1, ... keeping only the scored ones (module docstring): the first
    token of the group has index >= 1 on both sides, and every student token is a target."""
    student_first: dict[int, int] = {}
    teacher_first: dict[int, int] = {}
    all_targets: dict[int, bool] = {}
    for index, group in enumerate(student_groups):
        if group >= 0:
            student_first.setdefault(group, index)
            all_targets[group] = all_targets.get(group, True) and student_targets[index]
    for index, group in enumerate(teacher_groups):
        if group >= 0:
            teacher_first.setdefault(group, index)
    kept = sorted(
        group
        for group, index in student_first.items()
        if index >= 1 and teacher_first.get(group, 0) >= 1 and all_targets[group]
    )
    numbers = {group: number for number, group in enumerate(kept)}
    return (
        [numbers.get(g, -1) for g in student_groups],
        [numbers.get(g, -1) for g in teacher_groups],
    )


@dataclass
class _Stretch:
    """Tokens ``[start, stop)`` of a row between special tokens; ``[first, last)`` of them are
    whole UTF-8 characters spelling ``text`` (None: none are)."""

    start: int
    stop: int
    first: int
    last: int
    text: str | None


def _whole_characters(pieces: list[bytes]) -> tuple[int, int, str | None]:
    """(first, last, text): leave out leading tokens that start inside a UTF-8 character and
    trailing ones that end inside one (a block cut there); the rest decodes to ``text``."""
    first = 0
    while first < len(pieces) and pieces[first][:1] and (pieces[first][0] & 0xC0) == 0x80:
        # the token starts with a continuation byte: inside a character
        first += 1
    last = len(pieces)
    for _ in range(4):  # a character has at most 4 bytes: at most 3 tokens end inside it
        if last <= first:
            break
        try:
            return first, last, b"".join(pieces[first:last]).decode("utf-8")
        except UnicodeDecodeError:
            last -= 1
    return first, first, None


class TokenizerPair:
    """The teacher's and the student's tokenizers with their byte vocabularies: what aligning a
    row needs (module docstring). Build it after
    :func:`~distill.data.alignment.check_tokenizer_pair` accepted the pair."""

    def __init__(self, teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase):
        self.teacher = teacher
        self.student = student
        self.teacher_vocab = ByteVocab.from_tokenizer(teacher)
        self.student_vocab = ByteVocab.from_tokenizer(student)
        pad = teacher.pad_token_id if teacher.pad_token_id is not None else teacher.eos_token_id
        self.teacher_pad = pad if pad is not None else 0
        self._partners: dict[int, int | None] = {}

    def partner(self, student_id: int) -> int | None:
        """The teacher's special token playing the part of the student's special ``student_id``."""
        if student_id not in self._partners:
            self._partners[student_id] = self.student_vocab.special_partner(
                student_id, self.teacher_vocab
            )
        return self._partners[student_id]

    # --- packed text --------------------------------------------------------------------

    def _stretches(self, ids: list[int]) -> list[_Stretch | int]:
        """The row cut at its special tokens: :class:`_Stretch` es and special tokens' indices."""
        parts: list[_Stretch | int] = []
        index = 0
        while index < len(ids):
            if self.student_vocab.is_special(ids[index]):
                parts.append(index)
                index += 1
                continue
            start = index
            while index < len(ids) and not self.student_vocab.is_special(ids[index]):
                index += 1
            pieces = [self.student_vocab.token_bytes[i] for i in ids[start:index]]
            first, last, text = _whole_characters(pieces)  # type: ignore[arg-type]
            parts.append(_Stretch(start, index, start + first, start + last, text))
        return parts

    def align_block(
        self, ids: list[int], teacher_tokens: list[list[int]] | None = None
    ) -> AlignedRow:
        """One packed block of student token ids: the teacher's tokens of the same bytes and
        the scored groups (every token after the first is a target). ``teacher_tokens``: the
        teacher's tokenization of each stretch's text, if already done (batched)."""
        parts = self._stretches(ids)
        if teacher_tokens is None:
            teacher_tokens = self._tokenize([p.text for p in parts if isinstance(p, _Stretch)])
        student_spans: list[Span | None] = [None] * len(ids)
        teacher_ids: list[int] = []
        teacher_spans: list[Span | None] = []
        offset = 0
        stretches = iter(teacher_tokens)
        for part in parts:
            if isinstance(part, int):  # a special token: a shared marker unit, or width zero
                partner = self.partner(ids[part])
                if partner is None:
                    student_spans[part] = (offset, offset)
                    continue
                student_spans[part] = (offset, offset + 1)
                teacher_ids.append(partner)
                teacher_spans.append((offset, offset + 1))
                offset += 1
                continue
            tokens = next(stretches)
            if part.text is None:
                continue
            teacher_ids.extend(tokens)
            if self.teacher_vocab.text_bytes(tokens) != part.text.encode():
                teacher_spans.extend([None] * len(tokens))  # seen by both, aligned by none
                continue
            position = offset
            for index in range(part.first, part.last):
                width = len(self.student_vocab.token_bytes[ids[index]])  # type: ignore[arg-type]
                student_spans[index] = (position, position + width)
                position += width
            for token in tokens:
                width = len(self.teacher_vocab.token_bytes[token] or b"")
                teacher_spans.append((offset, offset + width))
                offset += width
        student_groups, teacher_groups, _ = align_spans(student_spans, teacher_spans)
        targets = [index >= 1 for index in range(len(ids))]
        return AlignedRow(teacher_ids, *scored_groups(student_groups, teacher_groups, targets))

    def _tokenize(self, texts: list[str | None]) -> list[list[int]]:
        present = [text for text in texts if text]
        encoded = iter(
            self.teacher(present, add_special_tokens=False)["input_ids"] if present else []
        )
        return [next(encoded) if text else [] for text in texts]

    def align_rows(self, blocks: torch.Tensor) -> list[AlignedRow]:
        """:meth:`align_block` of every student block ``[B, T]`` (the teacher tokenizes every
        stretch of them in one call)."""
        rows = blocks.tolist()
        parts = [self._stretches(ids) for ids in rows]
        texts = [[p.text for p in row if isinstance(p, _Stretch)] for row in parts]
        flat = self._tokenize([text for row in texts for text in row])
        aligned, used = [], 0
        for ids, row_texts in zip(rows, texts, strict=True):
            aligned.append(self.align_block(ids, flat[used : used + len(row_texts)]))
            used += len(row_texts)
        return aligned

    def align_blocks(self, blocks: torch.Tensor) -> CrossBatch:
        """A :class:`CrossBatch` for student blocks ``[B, T]``."""
        return self.collate(Batch.from_blocks(blocks, 1), self.align_rows(blocks))

    def collate(self, student: Batch, rows: list[AlignedRow]) -> CrossBatch:
        """Pad the rows' teacher side to one ``[B, Tt]`` (right padding, no groups there)."""
        width = max([1, *(len(row.teacher_ids) for row in rows)])
        teacher_ids = torch.full((len(rows), width), self.teacher_pad, dtype=torch.long)
        teacher_groups = torch.full((len(rows), width), -1, dtype=torch.long)
        for index, row in enumerate(rows):
            teacher_ids[index, : len(row.teacher_ids)] = torch.tensor(
                row.teacher_ids, dtype=torch.long
            )
            teacher_groups[index, : len(row.teacher_groups)] = torch.tensor(
                row.teacher_groups, dtype=torch.long
            )
        student_groups = torch.tensor([row.student_groups for row in rows], dtype=torch.long)
        return CrossBatch(student, teacher_ids, student_groups, teacher_groups)


class CrossBlockBatches:
    """:class:`CrossBatch` es from a student batch source: packed blocks
    (:class:`~distill.data.BlockBatches`, :class:`~distill.data.sources.WeightedBatches`),
    aligned for the teacher by ``pair`` when drawn; with ``pair`` None (labels only) any source,
    :class:`~distill.data.ExampleBatches` too, and no teacher side. The position is
    ``source``'s own (checkpoints restore it)."""

    def __init__(self, source: BlockBatches, pair: TokenizerPair | None):
        self.source = source
        self.pair = pair
        self.batch_size = source.batch_size

    def _cross(self, drawn: torch.Tensor | Batch) -> CrossBatch:
        if self.pair is None:
            batch = drawn if isinstance(drawn, Batch) else Batch.from_blocks(drawn, 1)
            return CrossBatch.labels_only(batch)
        if isinstance(drawn, Batch):
            raise ValueError(
                "chat / prompt-response rows are aligned when encoded: use CrossExamples"
            )
        return self.pair.align_blocks(drawn)

    def next_batch(self) -> CrossBatch:
        return self._cross(self.source.next_batch())

    def first_batch(self) -> CrossBatch:
        """The next micro-batch, without moving the position (a warm-up batch)."""
        return peek(self.source, self._cross)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def peek(source: BlockBatches, convert: Callable[[Any], CrossBatch]) -> CrossBatch:
    """``convert`` of ``source``'s next micro-batch, drawn without moving the position."""
    state = source.state_dict()
    drawn = source.next_batch()
    source.load_state_dict(state)
    return convert(drawn)
