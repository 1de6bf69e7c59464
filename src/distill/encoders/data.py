"""Encoder data: labelled rows from local .csv/.jsonl files, unlabelled sentences from documents.

Held-out splits are by a hash of each text, so they never change with file order or seed.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from distill.data.corpus import data_files
from distill.errors import DataError
from distill.io import jsonl_objects, text_lines

__all__ = ["read_labelled", "label_ids", "to_sentences", "augment_sentences"]

_SUFFIXES = (".csv", ".jsonl")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(`])")


def _rows_csv(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(text_lines(path))
    missing = [f for f in (text_field, label_field) if f not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: no {missing} column (columns: {reader.fieldnames})")
    return [(row[text_field], row[label_field]) for row in reader]


def _rows_jsonl(path: Path, text_field: str, label_field: str) -> list[tuple[str, str]]:
    rows = []
    for number, row in jsonl_objects(path):
        if text_field not in row or label_field not in row:
            raise DataError(f"{path}:{number}: row needs '{text_field}' and '{label_field}'")
        rows.append((str(row[text_field]), str(row[label_field])))
    return rows


def read_labelled(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """``(text, label)`` rows of a .csv/.jsonl file or of every such file in a directory (sorted).

    Labels are kept as strings; :func:`label_ids` maps them to class indices.
    """
    rows: list[tuple[str, str]] = []
    for file in data_files(path, _SUFFIXES):
        if file.suffix == ".csv":
            rows += _rows_csv(file, text_field, label_field)
        else:
            rows += _rows_jsonl(file, text_field, label_field)
    rows = [(text, label) for text, label in rows if text.strip()]
    if len(rows) < 2:
        raise DataError(f"data path {path} holds fewer than 2 labelled rows")
    return rows


def label_ids(labels: list[str], label2id: dict[str, int] | None, num_labels: int) -> list[int]:
    """Class indices of string labels: integers in ``[0, num_labels)`` as they are, otherwise
    the teacher's ``label2id`` names. Anything else is a :class:`DataError`."""
    if all(re.fullmatch(r"-?\d+", label) for label in labels):
        ids = [int(label) for label in labels]
        bad = sorted({i for i in ids if not 0 <= i < num_labels})
        if bad:
            raise DataError(f"labels {bad[:5]} are outside the teacher's {num_labels} classes")
        return ids
    unknown = sorted({label for label in labels if label not in (label2id or {})})
    if unknown:
        raise DataError(
            f"labels {unknown[:5]} are not integers and not in the teacher's label2id "
            f"{sorted(label2id or {})}"
        )
    return [label2id[label] for label in labels]  # type: ignore[index]


def to_sentences(documents: list[str], min_words: int = 4, max_words: int = 60) -> list[str]:
    """Distinct sentences of prose documents, whitespace collapsed, ``min_words..max_words`` long.

    Paragraphs are split on blank lines, then on sentence-ending punctuation followed by a
    capitalised word; lines that look like code or tables (few letters) are dropped.
    """
    seen: set[str] = set()
    sentences = []
    for document in documents:
        for paragraph in re.split(r"\n\s*\n", document):
            text = " ".join(paragraph.split())
            for sentence in _SENTENCE_END.split(text):
                words = sentence.split()
                letters = sum(ch.isalpha() for ch in sentence)
                if not min_words <= len(words) <= max_words or letters < 0.6 * len(sentence):
                    continue
                if sentence not in seen:
                    seen.add(sentence)
                    sentences.append(sentence)
    return sentences


# Augmentation: new inputs built from training sentences alone, for the teacher to label.
_DROP_PROBABILITY = 0.15  # share of words a word-dropped variant loses
_CROP_SHARE = (0.4, 0.9)  # a crop keeps this share of a sentence's words (at least 3)
_MIN_WORDS = 3


def _drop_words(sentences: list[str], rng: random.Random) -> str | None:
    """A random sentence with each word dropped with probability 0.15 (None: nothing dropped,
    or under 3 words left)."""
    words = rng.choice(sentences).split()
    kept = [word for word in words if rng.random() >= _DROP_PROBABILITY]
    return " ".join(kept) if _MIN_WORDS <= len(kept) < len(words) else None


def _crop(sentences: list[str], rng: random.Random) -> str | None:
    """A contiguous run of 40-90% of a random sentence's words (None: too short to crop)."""
    words = rng.choice(sentences).split()
    length = max(_MIN_WORDS, int(len(words) * rng.uniform(*_CROP_SHARE)))
    if length >= len(words):
        return None
    start = rng.randrange(len(words) - length + 1)
    return " ".join(words[start : start + length])


def _join_random(sentences: list[str], rng: random.Random) -> str | None:
    """Two random sentences joined: a longer input mixing two topics."""
    return f"{rng.choice(sentences)} {rng.choice(sentences)}"


def _join_next(sentences: list[str], rng: random.Random) -> str | None:
    """A sentence and the one after it (document order): a natural two-sentence passage."""
    index = rng.randrange(len(sentences) - 1)
    return f"{sentences[index]} {sentences[index + 1]}"


_AUGMENTATIONS = (_drop_words, _crop, _join_random, _join_next)


def augment_sentences(sentences: list[str], count: int, seed: int) -> list[str]:
    """``count`` distinct new inputs made only from ``sentences`` (none equal to one of them):
    each a word-dropped copy, a crop, two random sentences joined, or two consecutive ones
    joined, the kind and source picked uniformly at random. Same sentences and seed, same list.

    Why: a sentence embedder distilled on a few thousand sentences fits them (cosine 0.98 to
    the teacher) far better than unseen ones; the teacher's embeddings of these variants are
    extra targets at the price of one teacher forward each, with no text from outside the
    training split.
    """
    if count <= 0:
        return []
    if len(sentences) < 2:
        raise DataError("augmentation needs at least 2 training sentences")
    rng = random.Random(seed)
    seen = set(sentences)
    variants: list[str] = []
    for _ in range(50 * count):  # bounded: tiny corpora may run out of distinct variants
        text = rng.choice(_AUGMENTATIONS)(sentences, rng)
        if text is not None and text not in seen:
            seen.add(text)
            variants.append(text)
            if len(variants) == count:
                return variants
    raise DataError(
        f"could make only {len(variants)} of {count} distinct variants of "
        f"{len(sentences)} sentences: lower encoder.augment"
    )
