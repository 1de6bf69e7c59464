"""Where two tokenizations of the same text agree: each token's UTF-8 byte span, and the groups
of tokens that end on the same byte on both sides.

A byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM, Qwen, ...) writes every token as a string
over a 256-character alphabet, one character per byte, so each token id has exact bytes, and
the tokens of a text, concatenated, are the text's UTF-8 bytes; a multi-byte character may be
split between tokens. Spans come from those bytes, never from character offsets. Special tokens
(BOS, EOS, chat markers) have no bytes: the callers give one that both sides share (an EOS
between documents, an end of turn) a span of one *marker* unit in the shared coordinates, and
one that only one side has (a BOS) a span of width zero.

:func:`align_spans` groups the tokens of two sides laid over the same units: a *boundary* is an
offset where a token of each side starts or ends, and two consecutive common boundaries delimit
a group when the units between them are tiled by whole tokens on both sides. Every unit of the
aligned range lies in exactly one group, on both sides; a width-zero token joins the group that
starts where it sits.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from distill.errors import ModelError

__all__ = [
    "ByteVocab",
    "Span",
    "align_spans",
    "byte_level_alphabet",
    "byte_level_string",
    "check_byte_level",
    "check_tokenizer_pair",
    "string_pairs",
    "tokenizer_name",
    "unsupported_reason",
]

Span = tuple[int, int]  # [start, end) in units (bytes, plus one unit per shared special token)

# Checked on every tokenizer: accents, CJK, an emoji (4 bytes), runs of spaces, tabs, newlines.
_PROBE = "Ça coûte 5 €.  世界\n\t🙂 end"
# Special-token roles matched between two tokenizers before their contents are compared.
_ROLES = ("eos_token", "bos_token", "pad_token", "unk_token")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet, character -> byte: the printable Latin-1 bytes stand for
    themselves, every other byte ``b`` (controls, space, 127-160, 173) for the character
    ``256 + n``, ``n`` counting those bytes in order (GPT-2's convention, shared by every
    byte-level BPE tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet = {chr(byte): byte for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


def tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """How errors name a tokenizer: its directory (or hub name), else its class."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _has_byte_level(component: dict | None) -> dict | None:
    """The ByteLevel step of a tokenizer.json pre-tokenizer (alone or in a Sequence)."""
    if not component:
        return None
    if component.get("type") == "ByteLevel":
        return component
    for step in component.get("pretokenizers", []) or []:
        found = _has_byte_level(step)
        if found is not None:
            return found
    return None


def byte_level_string(data: bytes) -> str:
    """``data`` as byte-level BPE writes it in its vocabulary (``b" the"`` -> ``"Ġthe"``)."""
    characters = {byte: char for char, byte in byte_level_alphabet().items()}
    return "".join(characters[byte] for byte in data)


def unsupported_reason(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why the tokens of ``tokenizer`` have no exact byte spans, or None when they do: a fast
    tokenizer with a BPE model, a ByteLevel pre-tokenizer that adds no prefix space, no
    normalizer (or NFC), whose tokens spell the bytes of a probe text exactly."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return f"a slow {type(tokenizer).__name__} (a fast tokenizer.json is needed)"
    spec = json.loads(backend.to_str())
    model = spec.get("model", {}).get("type")
    if model != "BPE":
        return f"a {model} tokenizer, not byte-level BPE (its tokens have no bytes)"
    byte_level = _has_byte_level(spec.get("pre_tokenizer"))
    if byte_level is None:
        fallback = ", byte fallback" if spec["model"].get("byte_fallback") else ""
        return f"BPE without a ByteLevel pre-tokenizer{fallback} (SentencePiece-style)"
    if byte_level.get("add_prefix_space"):
        return "byte-level BPE with add_prefix_space (it adds a byte that is not in the text)"
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        return f"a {normalizer} normalizer (its tokens spell other bytes than the text's)"
    vocab = ByteVocab.from_tokenizer(tokenizer)
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if vocab.text_bytes(ids) != _PROBE.encode():
        return "its tokens do not spell the bytes of the text they encode"
    return None


def _describe(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    return f"{name} ({type(tokenizer).__name__}, {len(tokenizer)} tokens)"


# What every refusal ends with: the kinds of tokenizer distill aligns.
_SUPPORTED = (
    "distill aligns tokens on bytes across vocabularies and supports byte-level BPE "
    "tokenizers only (GPT-2, Llama 3, Qwen2, SmolLM)"
)


def check_byte_level(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Raise :class:`ModelError` (one line naming ``name``) unless ``tokenizer``'s tokens have
    exact byte spans (:func:`unsupported_reason`)."""
    reason = unsupported_reason(tokenizer)
    if reason is not None:
        raise ModelError(f"tokenizer of {_describe(tokenizer, name)} is {reason}; {_SUPPORTED}")


def check_tokenizer_pair(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    teacher_name: str | None = None,
    student_name: str | None = None,
) -> None:
    """Raise :class:`ModelError` (one line naming both tokenizers) unless both have exact byte
    spans (:func:`unsupported_reason`): what aligning, comparing per byte and initialising a new
    vocabulary's rows from the teacher's need."""
    teacher_name = teacher_name or tokenizer_name(teacher)
    student_name = student_name or tokenizer_name(student)
    problems = [
        f"the {side}'s is {reason}"
        for side, tokenizer in (("teacher", teacher), ("student", student))
        if (reason := unsupported_reason(tokenizer)) is not None
    ]
    if problems:
        raise ModelError(
            f"unsupported tokenizer pair: teacher {_describe(teacher, teacher_name)}, student "
            f"{_describe(student, student_name)}: {'; '.join(problems)}; {_SUPPORTED}"
        )


@dataclass(frozen=True)
class ByteVocab:
    """Every token id's bytes (None for a special token, which has none) and the special
    tokens' roles (``eos_token`` -> id, ...)."""

    token_bytes: tuple[bytes | None, ...]
    special_roles: dict[str, int]
    special_texts: dict[int, str]  # special id -> its content (as a chat template writes it)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> ByteVocab:
        """Decode every entry of a byte-level BPE vocabulary through the byte alphabet; an added
        token that is not special is raw text (its UTF-8 bytes)."""
        alphabet = byte_level_alphabet()
        vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
        added = tokenizer.added_tokens_decoder
        token_bytes: list[bytes | None] = [b""] * (max(vocab.values()) + 1)
        for text, token_id in vocab.items():
            if token_id in added:
                token_bytes[token_id] = None if added[token_id].special else text.encode()
            elif all(char in alphabet for char in text):
                token_bytes[token_id] = bytes(alphabet[char] for char in text)
            else:
                token_bytes[token_id] = text.encode()
        roles = {
            role: token_id
            for role in _ROLES
            if (token_id := getattr(tokenizer, f"{role}_id", None)) is not None
        }
        texts = {token_id: str(token) for token_id, token in added.items() if token.special}
        return cls(tuple(token_bytes), roles, texts)

    def is_special(self, token_id: int) -> bool:
        return self.token_bytes[token_id] is None

    def text_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes the (non-special) tokens spell, concatenated."""
        return b"".join(self.token_bytes[i] or b"" for i in ids)

    def rendered_bytes(self, token_id: int) -> bytes:
        """The token's bytes in a rendered text: a special token's are its content's."""
        spelled = self.token_bytes[token_id]
        return spelled if spelled is not None else self.special_texts[token_id].encode()

    def special_partner(self, token_id: int, other: ByteVocab) -> int | None:
        """The special token of ``other`` that plays this special token's part: the same role
        (EOS for EOS), else the same content; None when ``other`` has none."""
        for role, own in self.special_roles.items():
            if own == token_id and role in other.special_roles:
                return other.special_roles[role]
        content = self.special_texts.get(token_id)
        return next((own for own, text in other.special_texts.items() if text == content), None)


def string_pairs(
    teacher: ByteVocab, student: ByteVocab, teacher_rows: int, student_rows: int
) -> tuple[list[int], list[int]]:
    """(teacher ids, student ids) of the tokens both vocabularies hold, one to one: special
    tokens of the same role first (EOS with EOS), then tokens of the same bytes and special
    tokens of the same content; only ids below each side's output rows."""
    pairs: dict[int, int] = {}  # student id -> teacher id
    taken: set[int] = set()  # teacher ids paired

    def pair(student_id: int | None, teacher_id: int | None) -> None:
        if student_id is None or teacher_id is None or student_id >= student_rows:
            return
        if teacher_id < teacher_rows and student_id not in pairs and teacher_id not in taken:
            pairs[student_id] = teacher_id
            taken.add(teacher_id)

    for role in _ROLES:
        pair(student.special_roles.get(role), teacher.special_roles.get(role))
    by_bytes: dict[bytes, int] = {}
    for token_id, spelled in enumerate(student.token_bytes):
        if spelled and spelled not in by_bytes:
            by_bytes[spelled] = token_id
    by_content = {text: token_id for token_id, text in student.special_texts.items()}
    for token_id, spelled in enumerate(teacher.token_bytes[:teacher_rows]):
        if spelled is None:
            pair(by_content.get(teacher.special_texts[token_id]), token_id)
        else:
            pair(by_bytes.get(spelled), token_id)
    student_ids = sorted(pairs)
    return [pairs[s] for s in student_ids], student_ids


def _boundaries(spans: Sequence[Span | None]) -> set[int]:
    return {offset for span in spans if span is not None for offset in span}


def align_spans(
    first: Sequence[Span | None], second: Sequence[Span | None]
) -> tuple[list[int], list[int], list[Span]]:
    """Group two tokenizations laid over the same units (see the module docstring).

    ``first`` and ``second`` give each token's span, in order and without overlaps, or None for
    a token outside the aligned text (a chat template's own tokens). Returns the group index of
    every token of each side (-1: in no group) and each group's span. A token that crosses a
    common boundary cannot exist (a side has a boundary only where its tokens start or end), so
    the groups tile every stretch both sides cover with whole tokens.
    """
    common = sorted(_boundaries(first) & _boundaries(second))
    if len(common) < 2:
        return [-1] * len(first), [-1] * len(second), []
    intervals = len(common) - 1

    def place(spans: Sequence[Span | None]) -> tuple[list[int], list[int]]:
        interval_of, covered = [], [0] * intervals
        for span in spans:
            if span is None:
                interval_of.append(-1)
                continue
            start, end = span
            k = bisect.bisect_right(common, start) - 1
            if k < 0 or k >= intervals or end > common[k + 1]:
                interval_of.append(-1)
                continue
            interval_of.append(k)
            covered[k] += end - start
        return interval_of, covered

    first_at, first_covered = place(first)
    second_at, second_covered = place(second)
    group_of: dict[int, int] = {}
    spans: list[Span] = []
    for k in range(intervals):
        width = common[k + 1] - common[k]
        if first_covered[k] == width and second_covered[k] == width:
            group_of[k] = len(spans)
            spans.append((common[k], common[k + 1]))
    return (
        [group_of.get(k, -1) for k in first_at],
        [group_of.get(k, -1) for k in second_at],
        spans,
    )
