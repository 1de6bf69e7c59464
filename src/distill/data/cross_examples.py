"""Chat and prompt-response rows for two tokenizers, aligned once when encoded.

Each side renders a chat row with its own chat template (the teacher sees its own markers, the
student learns its own); each assistant turn's content bytes, followed by one marker unit for the
special token that ends the turn (``<|im_end|>`` on one side, ``</s>`` or ``<|eot_id|>`` on the
other), are laid over shared units, and the templates' own tokens belong to no group. A
prompt-response row likewise: the response bytes, then the EOS. Groups and scoring as in
:mod:`distill.data.cross_tokenizer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from distill.data.alignment import ByteVocab, Span, align_spans
from distill.data.blocks import BlockBatches
from distill.data.chat import check_messages, render_chat, require_chat_template
from distill.data.cross_tokenizer import (
    AlignedRow,
    CrossBatch,
    TokenizerPair,
    peek,
    scored_groups,
)
from distill.data.examples import Batch, Examples, targets_from_mask
from distill.errors import DataError
from distill.losses import IGNORE_INDEX

__all__ = ["CrossExampleBatches", "CrossExamples", "align_example", "encode_cross_examples"]

log = logging.getLogger(__name__)


def align_example(
    pair: TokenizerPair, row: dict, data_format: str, where: str, block_size: int
) -> tuple[list[int], list[bool], AlignedRow]:
    """A chat or prompt-response row: the student's ids (cut at ``block_size``) and target
    mask, and the aligned teacher side (cut after its last scored token)."""
    finished = row.get("finished", True) is not False
    if data_format == "chat":
        messages = check_messages(row.get("messages"), where)
        student_ids, targets, student_spans = _chat_side(
            pair.student, pair.student_vocab, messages, finished
        )
        teacher_ids, _, teacher_spans = _chat_side(
            pair.teacher, pair.teacher_vocab, messages, finished
        )
        student_spans, teacher_spans = _shared_units(student_spans, teacher_spans)
    else:
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise DataError(f"{where}: expected text fields `prompt` and `response`")
        student_ids, targets, student_spans = _response_side(
            pair.student, pair.student_vocab, prompt, response, finished
        )
        teacher_ids, _, teacher_spans = _response_side(
            pair.teacher, pair.teacher_vocab, prompt, response, finished
        )
    student_ids, targets = student_ids[:block_size], targets[:block_size]
    student_groups, teacher_groups, _ = align_spans(student_spans[:block_size], teacher_spans)
    token_targets = [target and index >= 1 for index, target in enumerate(targets)]
    student_groups, teacher_groups = scored_groups(student_groups, teacher_groups, token_targets)
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
        where = f"{source} row {index + 1}"
        ids, targets, aligned = align_example(pair, row, data_format, where, block_size)
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
        return peek(self, lambda batch: batch)
