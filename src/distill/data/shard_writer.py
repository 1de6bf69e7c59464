"""``distill data prepare``: a corpus tokenized once into token shards (format: ``data.shards``).

Map of a run:
  1. one pass over the documents: each one's sha256 and length (under 100 bytes per document,
     never its text), the train / held-out split (:func:`~distill.data.corpus.heldout_mask`,
     the rule a run applies in memory) and a fingerprint of the corpus;
  2. ``progress.json`` (the settings, each finished shard, where the next one starts); a
     directory holding another corpus, tokenizer or settings is refused, so a rerun can only
     resume the same preparation;
  3. per split, the documents streamed again in order, tokenized in batches, each followed by
     EOS; every ``shard_tokens`` tokens become one shard file, written to a temp file and
     renamed, then recorded in ``progress.json`` with the document and token offset the next
     shard starts at (a kill leaves whole shards; a rerun continues from the last recorded one);
  4. ``manifest.json`` (with every shard's sha256 and its own checksum) written last; then
     ``progress.json`` is removed.
Nothing depends on timing or interruptions, so a resumed preparation writes the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from distill.data.corpus import CorpusSplit, corpus_split
from distill.data.shards import (
    FORMAT,
    MANIFEST,
    SPLIT_RULE,
    SPLITS,
    STREAM_RULE,
    ShardError,
    manifest_checksum,
    numpy_dtype,
    read_manifest,
    shard_file,
    token_dtype,
)
from distill.io import atomic_write_bytes, atomic_write_json

__all__ = ["PROGRESS", "write_shards"]

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
_BATCH_DOCUMENTS = 64  # documents tokenized together (a fast tokenizer runs them in parallel)
_RESULT_KEYS = ("complete", "splits", "manifest_sha256")  # the rest must match to resume


class _Stream:
    """Tokens waiting to be written, as ``[document, offset, ids]`` pieces, oldest first."""

    def __init__(self) -> None:
        self.pieces: deque[list[Any]] = deque()
        self.size = 0

    def add(self, document: int, offset: int, ids: np.ndarray) -> None:
        if offset < len(ids):
            self.pieces.append([document, offset, ids])
            self.size += len(ids) - offset

    def take(self, count: int) -> np.ndarray:
        out = []
        while count:
            piece = self.pieces[0]
            document, offset, ids = piece
            step = min(count, len(ids) - offset)
            out.append(ids[offset : offset + step])
            piece[1] += step
            count -= step
            self.size -= step
            if piece[1] == len(ids):
                self.pieces.popleft()
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def position(self, after: int) -> list[int]:
        """Where the first waiting token lies: [document, token offset]; ``after`` (the next
        document to read) when nothing waits."""
        return [self.pieces[0][0], self.pieces[0][1]] if self.pieces else [after, 0]


def _plan(identity: dict[str, Any], split: CorpusSplit, fraction: float, shard_tokens: int):
    held = split.heldout
    return {
        "format": FORMAT,
        "complete": False,
        **identity,
        "source": {
            **identity["source"],
            "documents": len(held),
            "characters": int(split.sizes.sum()),
            "fingerprint": split.fingerprint,
        },
        "split": {
            "rule": SPLIT_RULE,
            "heldout_fraction": fraction,
            "train_documents": int((~held).sum()),
            "heldout_documents": int(held.sum()),
        },
        "stream": STREAM_RULE,
        "dtype": token_dtype(identity["tokenizer"]["vocab_size"]),
        "shard_tokens": shard_tokens,
        "splits": {
            name: {"tokens": 0, "shards": [], "next": [0, 0], "complete": False} for name in SPLITS
        },
    }


def _first_difference(have: Any, want: Any, name: str) -> tuple[str, Any, Any] | None:
    if have == want:
        return None
    while isinstance(have, dict) and isinstance(want, dict):
        key = next(k for k in {**want, **have} if have.get(k) != want.get(k))
        have, want, name = have.get(key), want.get(key), f"{name}.{key}"
    return name, have, want


def _refuse_other(directory: Path, existing: dict[str, Any], plan: dict[str, Any]) -> None:
    """A directory is only resumed (or found complete) with the same corpus and settings."""
    for key, value in plan.items():
        if key in _RESULT_KEYS:
            continue
        difference = _first_difference(existing.get(key), value, key)
        if difference:
            name, have, want = difference
            raise ShardError(
                f"{directory} already holds token shards with another {name} ({have!r} there, "
                f"{want!r} now): choose another directory"
            )


def _start(directory: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The progress to continue from (a new plan, or the one on disk); None when the
    directory already holds these shards complete."""
    if (directory / MANIFEST).is_file():
        _refuse_other(directory, read_manifest(directory), plan)
        return None
    progress_file = directory / PROGRESS
    if not progress_file.is_file():
        atomic_write_json(progress_file, plan)
        return plan
    try:
        progress = json.loads(progress_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShardError(f"{progress_file}: not valid JSON; delete the directory") from None
    _refuse_other(directory, progress, plan)
    itemsize = numpy_dtype(progress["dtype"]).itemsize
    for state in progress["splits"].values():
        for shard in state["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                raise ShardError(
                    f"{progress_file} lists {shard['file']}, which is missing or changed: "
                    "delete the directory and prepare again"
                )
    return progress


def _tokenized(
    documents: Iterator[tuple[int, str]], tokenizer: PreTrainedTokenizerBase, eos: int | None
) -> Iterator[tuple[int, np.ndarray]]:
    """(document index, its token ids + EOS) of each document, tokenized in batches."""
    batch: list[tuple[int, str]] = []

    def encode() -> Iterator[tuple[int, np.ndarray]]:
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]
        for (index, _), ids in zip(batch, encoded, strict=True):
            yield index, np.asarray(ids + ([eos] if eos is not None else []), dtype=np.int64)

    for item in documents:
        batch.append(item)
        if len(batch) == _BATCH_DOCUMENTS:
            yield from encode()
            batch = []
    if batch:
        yield from encode()


def _write_split(
    directory: Path,
    name: str,
    documents: Callable[[], Iterator[str]],
    members: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    progress: dict[str, Any],
    advance: Callable[[int], None],
) -> None:
    """Write (or continue) one split's shards; ``progress`` is saved after every shard."""
    state = progress["splits"][name]
    shard_tokens, dtype = progress["shard_tokens"], numpy_dtype(progress["dtype"])
    limit = np.iinfo(dtype).max
    start_document, skip = state["next"]
    stream = _Stream()

    def wanted() -> Iterator[tuple[int, str]]:
        for index, text in enumerate(documents()):
            if index >= start_document and members[index]:
                yield index, text

    def flush(count: int, after: int) -> None:
        tokens = stream.take(count)
        if tokens.size and int(tokens.max()) > limit:
            raise ShardError(f"token id {int(tokens.max())} does not fit {progress['dtype']}")
        data = tokens.astype(dtype).tobytes()
        file = shard_file(name, len(state["shards"]))
        atomic_write_bytes(directory / file, data)
        sha256 = hashlib.sha256(data).hexdigest()
        state["shards"].append({"file": file, "tokens": int(tokens.size), "sha256": sha256})
        state["tokens"] += int(tokens.size)
        state["next"] = stream.position(after)
        atomic_write_json(directory / PROGRESS, progress)

    next_document = start_document
    for index, ids in _tokenized(wanted(), tokenizer, tokenizer.eos_token_id):
        stream.add(index, skip if index == start_document else 0, ids)
        next_document = index + 1
        advance(index)
        while stream.size >= shard_tokens:
            flush(shard_tokens, next_document)
    if stream.size:
        flush(stream.size, next_document)
    state["complete"] = True
    state["next"] = [len(members), 0]
    atomic_write_json(directory / PROGRESS, progress)


def write_shards(
    documents: Callable[[], Iterator[str]],
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    *,
    identity: dict[str, Any],
    heldout_fraction: float,
    shard_tokens: int,
    where: str = "",
) -> dict[str, Any]:
    """Write (or resume, or find complete) the token shards of ``documents()`` (a fresh
    iterator each call, same documents in the same order) into ``directory``; returns the
    manifest. ``identity``: ``{"tokenizer": ..., "source": {"path", "text_field"}}``."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens} must be >= 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    split = corpus_split(documents(), heldout_fraction, where)
    plan = _plan(identity, split, heldout_fraction, shard_tokens)
    progress = _start(directory, plan)
    if progress is None:
        log.info("%s already holds these token shards, complete", directory)
        return read_manifest(directory)
    for stale in directory.glob(".*.tmp"):  # temp files of a killed run
        stale.unlink(missing_ok=True)
    done = 0  # characters of the documents already written, for the progress bar
    for name in SPLITS:
        members = split.heldout if name == "heldout" else ~split.heldout
        written = progress["splits"][name]["next"][0]
        done += int(split.sizes[:written][members[:written]].sum())
    total = int(split.sizes.sum())
    bar = tqdm(total=total, initial=done, desc="data prepare", unit="char", unit_scale=True)
    for name in SPLITS:
        if progress["splits"][name]["complete"]:
            continue
        members = split.heldout if name == "heldout" else ~split.heldout
        _write_split(
            directory,
            name,
            documents,
            members,
            tokenizer,
            progress,
            lambda index: bar.update(int(split.sizes[index])),
        )
    bar.close()
    manifest = {key: value for key, value in progress.items() if key != "splits"}
    manifest["complete"] = True
    manifest["splits"] = {
        name: {"tokens": state["tokens"], "shards": state["shards"]}
        for name, state in progress["splits"].items()
    }
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    atomic_write_json(directory / MANIFEST, manifest)
    (directory / PROGRESS).unlink(missing_ok=True)
    return manifest
