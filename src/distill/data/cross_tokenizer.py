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
- **Chat rows**, aligned once at encoding: the teacher renders the conversation with its own
  chat template; each assistant turn's content bytes, followed by one marker unit for the
  special token that ends the turn (``<|im_end|>`` on one side, ``<|eot_id|>`` on the other), is
  laid over shared units; the templates' own tokens belong to no group. **Prompt-response
  rows** likewise: the response bytes, then the EOS.

A group is *scored* when it is predictable on both sides (its first token has a predecessor:
the row whose logits predict it) and every student token in it is a training target. Scored
groups are numbered 0, 1, ... per row, the same numbers on both sides; every other token gets -1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from distill.data.alignment import ByteVocab, Span, align_spans
from distill.data.blocks import BlockBatches
from distill.data.chat import check_messages, render_chat, require_chat_template
from distill.data.examples import Batch, Examples, targets_from_mask
from distill.errors import DataError
from distill.losses import IGNORE_INDEX

__all__ = [
    "AlignedRow",
    "CrossBatch",
    "CrossBlockBatches",
    "CrossExampleBatches",
    "CrossExamples",
    "TokenizerPair",
    "encode_cross_examples",
    "scored_groups",
]

log = logging.getLogger(__name__)


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

    def align_blocks(self, blocks: torch.Tensor) -> CrossBatch:
        """A :class:`CrossBatch` for student blocks ``[B, T]`` (the teacher tokenizes every
        stretch of the batch in one call)."""
        rows = blocks.tolist()
        parts = [self._stretches(ids) for ids in rows]
        texts = [[p.text for p in row if isinstance(p, _Stretch)] for row in parts]
        flat = self._tokenize([text for row in texts for text in row])
        aligned, used = [], 0
        for ids, row_texts in zip(rows, texts, strict=True):
            aligned.append(self.align_block(ids, flat[used : used + len(row_texts)]))
            used += len(row_texts)
        return self.collate(Batch.from_blocks(blocks, 1), aligned)

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

    # --- chat and prompt-response rows ----------------------------------------------------

    def align_example(
        self, row: dict, data_format: str, where: str, block_size: int
    ) -> tuple[list[int], list[bool], AlignedRow]:
        """A chat or prompt-response row: the student's ids (cut at ``block_size``) and target
        mask, and the aligned teacher side (cut after its last scored token)."""
        finished = row.get("finished", True) is not False
        if data_format == "chat":
            messages = check_messages(row.get("messages"), where)
            student_ids, targets, student_spans = _chat_side(
                self.student, self.student_vocab, messages, finished
            )
            teacher_ids, _, teacher_spans = _chat_side(
                self.teacher, self.teacher_vocab, messages, finished
            )
            student_spans, teacher_spans = _shared_units(student_spans, teacher_spans)
        else:
            prompt, response = row.get("prompt"), row.get("response")
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(f"{where}: expected text fields `prompt` and `response`")
            student_ids, targets, student_spans = _response_side(
                self.student, self.student_vocab, prompt, response, finished
            )
            teacher_ids, _, teacher_spans = _response_side(
                self.teacher, self.teacher_vocab, prompt, response, finished
            )
        student_ids, targets = student_ids[:block_size], targets[:block_size]
        student_groups, teacher_groups, _ = align_spans(student_spans[:block_size], teacher_spans)
        token_targets = [target and index >= 1 for index, target in enumerate(targets)]
        student_groups, teacher_groups = scored_groups(
            student_groups, teacher_groups, token_targets
        )
        last = max((i for i, g in enumerate(teacher_groups) if g >= 0), default=0)
        aligned = AlignedRow(teacher_ids[: last + 1], student_groups, teacher_groups[: last + 1])
        return student_ids, targets, aligned


def _rendered_spans(vocab: ByteVocab, ids: list[int]) -> list[Span]:
    """Each token's byte span in the text it was tokenized from (special tokens: their content)."""
    spans, position = [], 0
    for token in ids:
        width = len(vocab.rendered_bytes(token))
        spans.append((position, position + width))
        position += width
    return spans


def _chat_side(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ByteVocab,
    messages: list[dict[str, str]],
    finished: bool,
) -> tuple[list[int], list[bool], list[tuple[int, Span | None]]]:
    """One side of a chat row in its own template: ids, which are assistant-written, and per
    token (message index, byte span relative to that assistant message's content start), the
    message index -1 for a template token; the special token that ends a turn gets the span
    ``(L, L + 1)`` after its content of ``L`` bytes."""
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids, is_target = render_chat(tokenizer, messages, "chat", finished)
    ranges: list[tuple[int, int, int]] = []  # (message index, content byte start, end)
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"]:
            continue
        prefix = (
            tokenizer.apply_chat_template(
                messages[:index], tokenize=False, add_generation_prompt=True
            )
            if index
            else ""
        )
        at = full.find(message["content"], len(prefix))
        if at >= 0:
            start = len(full[:at].encode())
            ranges.append((index, start, start + len(message["content"].encode())))
    spans = _rendered_spans(vocab, ids)
    if not spans or spans[-1][1] != len(full.encode()):
        return ids, is_target, [(-1, None)] * len(ids)  # the tokens do not spell the rendering
    placed: list[tuple[int, Span | None]] = []
    for token, (start, end) in zip(ids, spans, strict=True):
        where: tuple[int, Span | None] = (-1, None)
        for index, content_start, content_end in ranges:
            if content_start <= start and end <= content_end and end > start:
                where = (index, (start - content_start, end - content_start))
            elif start == content_end and vocab.is_special(token):
                width = content_end - content_start
                where = (index, (width, width + 1))
        placed.append(where)
    return ids, is_target, placed


def _shared_units(
    student: list[tuple[int, Span | None]],
    teacher: list[tuple[int, Span | None]],
) -> tuple[list[Span | None], list[Span | None]]:
    """Both sides' spans moved into shared units: the assistant messages both sides located, in
    order, each taking its content bytes plus one end-of-turn marker unit."""
    located = sorted(
        {m for m, span in student if span is not None}
        & {m for m, span in teacher if span is not None}
    )
    bases, base = {}, 0
    for message in located:
        bases[message] = base
        widths = [span[1] for m, span in student + teacher if m == message and span is not None]
        base += max(widths) + 1  # content bytes + the marker (max: at least one side has it)

    def shift(side: list[tuple[int, Span | None]]) -> list[Span | None]:
        return [
            (span[0] + bases[m], span[1] + bases[m]) if span is not None and m in bases else None
            for m, span in side
        ]

    return shift(student), shift(teacher)


def _response_side(
    tokenizer: PreTrainedTokenizerBase,
    vocab: ByteVocab,
    prompt: str,
    response: str,
    finished: bool,
) -> tuple[list[int], list[bool], list[Span | None]]:
    """One side of a prompt-response row: prompt + response (+ EOS when ``finished``), the
    response (and EOS) as targets, spans over the response bytes then one EOS marker unit."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    spelled = vocab.text_bytes(response_ids) == response.encode()
    spans: list[Span | None] = [None] * len(prompt_ids)
    position = 0
    for token in response_ids:
        width = len(vocab.token_bytes[token] or b"")
        spans.append((position, position + width) if spelled else None)
        position += width
    ids = prompt_ids + response_ids
    if finished and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        spans.append((position, position + 1) if spelled else None)
    return ids, [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids)), spans


@dataclass
class CrossExamples:
    """Encoded chat / prompt-response rows for both tokenizers: the student's
    :class:`~distill.data.Examples` and, per row, the teacher's ids and both sides' groups."""

    student: Examples
    teacher_ids: torch.Tensor  # (N, Tt), right-padded
    teacher_lengths: torch.Tensor  # (N,)
    student_groups: torch.Tensor  # (N, Ts)
    teacher_groups: torch.Tensor  # (N, Tt)

    def __len__(self) -> int:
        return len(self.student)

    def batch(self, indices: torch.Tensor) -> CrossBatch:
        """The rows ``indices``, each side cut to its longest row."""
        width = int(self.student.lengths[indices].max())
        teacher_width = max(1, int(self.teacher_lengths[indices].max()))
        student = Batch(
            self.student.input_ids[indices, :width],
            self.student.labels[indices, :width],
            self.student.prompt_lengths[indices],
        )
        return CrossBatch(
            student,
            self.teacher_ids[indices, :teacher_width],
            self.student_groups[indices, :width],
            self.teacher_groups[indices, :teacher_width],
        )


def encode_cross_examples(
    rows: list[dict], data_format: str, pair: TokenizerPair, block_size: int, source: str
) -> CrossExamples:
    """Chat or prompt-response ``rows`` for both tokenizers (module docstring). The student's
    side is what :func:`~distill.data.examples.encode_examples` makes of them; rows without a
    target within ``block_size`` are dropped (a warning), none left is a :class:`DataError`."""
    if data_format == "chat":
        require_chat_template(pair.student, source)
        require_chat_template(pair.teacher, source)
    encoded = []
    for index, row in enumerate(rows):
        ids, targets, aligned = pair.align_example(
            row, data_format, f"{source} row {index + 1}", block_size
        )
        labels = targets_from_mask(ids, targets)
        first = next((t for t, label in enumerate(labels) if label != IGNORE_INDEX), None)
        if first is not None:
            encoded.append((ids, labels, first + 1, aligned))
    if len(encoded) < len(rows):
        log.warning(
            "%s: %d of %d rows have no target token within data.block_size=%d; dropped",
            source,
            len(rows) - len(encoded),
            len(rows),
            block_size,
        )
    if not encoded:
        raise DataError(f"{source}: no row has a target token within data.block_size={block_size}")
    n = len(encoded)
    student_pad = pair.student.pad_token_id if pair.student.pad_token_id is not None else 0
    teacher_width = max([1, *(len(a.teacher_ids) for *_, a in encoded)])
    input_ids = torch.full((n, block_size), student_pad, dtype=torch.long)
    labels = torch.full((n, block_size), IGNORE_INDEX, dtype=torch.long)
    student_groups = torch.full((n, block_size), -1, dtype=torch.long)
    teacher_ids = torch.full((n, teacher_width), pair.teacher_pad, dtype=torch.long)
    teacher_groups = torch.full((n, teacher_width), -1, dtype=torch.long)
    for row, (ids, row_labels, _, aligned) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(row_labels)
        student_groups[row, : len(ids)] = torch.tensor(aligned.student_groups)
        teacher_ids[row, : len(aligned.teacher_ids)] = torch.tensor(aligned.teacher_ids)
        teacher_groups[row, : len(aligned.teacher_ids)] = torch.tensor(aligned.teacher_groups)
    student = Examples(
        input_ids,
        labels,
        torch.tensor([len(ids) for ids, *_ in encoded]),
        torch.tensor([prompt for _, _, prompt, _ in encoded]),
    )
    lengths = torch.tensor([len(a.teacher_ids) for *_, a in encoded])
    return CrossExamples(student, teacher_ids, lengths, student_groups, teacher_groups)


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
        return _peek(self.source, self._cross)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def _peek(source: BlockBatches, convert):
    state = source.state_dict()
    drawn = source.next_batch()
    source.load_state_dict(state)
    return convert(drawn)


class CrossExampleBatches(BlockBatches):
    """:class:`~distill.data.BlockBatches` over :class:`CrossExamples`: yields
    :class:`CrossBatch` es, each side cut to its longest row."""

    def __init__(self, examples: CrossExamples, batch_size: int, seed: int):
        super().__init__(examples.student.input_ids, batch_size, seed)
        self.examples = examples

    def next_batch(self) -> CrossBatch:  # type: ignore[override]
        return self.examples.batch(self._next_indices())

    def first_batch(self) -> CrossBatch:
        """The next micro-batch, without moving the position (a warm-up batch)."""
        return _peek(self, lambda batch: batch)
