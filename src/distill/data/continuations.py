"""Prefixes drawn from a corpus's training split, for the teacher to continue
(``distill generate`` with ``generate.mode=continue``).

Only training documents are drawn (the split of :func:`~distill.data.corpus.corpus_split`, the
one a run makes), so no held-out text reaches the generated data. A document is drawn with
probability proportional to its length in characters and a start word uniformly within it, so
prefixes cover the corpus evenly and begin at a word (they may end inside one: the teacher
completes it). The draws are a pure function of the seed; the corpus is read
twice (hashing, then tokenizing only the drawn documents), so memory grows with the number of
prefixes, not with the corpus.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np
from transformers import PreTrainedTokenizerBase

from distill.data.corpus import CorpusSplit

__all__ = ["draw_prefixes"]

_WORD_START = re.compile(r"(?<!\S)\S")  # a non-space character at the start or after a space
_CHARS_PER_TOKEN = 32  # a window this many characters per token holds the prefix's tokens


def draw_prefixes(
    documents: Callable[[], Iterator[str]],
    split: CorpusSplit,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    prefix_tokens: int,
    seed: int,
) -> list[str]:
    """``count`` prefixes (text) of at most ``prefix_tokens`` tokens from the training documents
    of ``documents()`` (``split``: that corpus's split): from a drawn word start, the first
    ``prefix_tokens`` tokens, decoded; the caller tokenizes the text again, as training will."""
    rng = np.random.default_rng(seed)
    weights = np.where(split.heldout, 0, split.sizes).astype(np.float64)
    chosen = rng.choice(len(weights), size=count, p=weights / weights.sum())  # [count]
    starts = rng.random(count)  # [count]: where among its document's word starts each begins
    wanted: dict[int, list[int]] = {}
    for draw, document in enumerate(chosen.tolist()):
        wanted.setdefault(document, []).append(draw)
    prefixes: list[str] = [""] * count
    for index, text in enumerate(documents()):
        if index not in wanted:
            continue
        words = [match.start() for match in _WORD_START.finditer(text)]
        for draw in wanted[index]:
            start = words[int(starts[draw] * len(words))]
            window = text[start : start + _CHARS_PER_TOKEN * prefix_tokens]
            ids = tokenizer(window, add_special_tokens=False)["input_ids"][:prefix_tokens]
            prefixes[draw] = tokenizer.decode(ids)
    return prefixes
