"""A causal-LM run's training data: the corpus (or ``data.sources``, or token shards) split into
training and held-out parts, packed into blocks or encoded as chat / prompt-response examples,
routed to ``teachers:``; and the split text itself (for a new vocabulary, bits per byte)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from distill.config import RunConfig, SourceConfig
from distill.data import (
    Examples,
    Routing,
    default_documents,
    pack_documents,
    read_documents,
)
from distill.data.corpus import read_routed_documents, split_by_hash, split_documents
from distill.data.cross_examples import encode_cross_examples
from distill.data.cross_tokenizer import TokenizerPair
from distill.data.examples import detect_format, encode_examples, read_rows, split_rows
from distill.data.routing import pack_routed
from distill.data.shards import open_run_shards
from distill.evaluate.fidelity import block_prompt_tokens

__all__ = [
    "TrainingData",
    "corpus_training_texts",
    "prepare_cross_data",
    "prepare_data",
    "prepare_sources",
    "prepare_training_data",
    "split_texts",
]


def _split_file_texts(
    path: str | None, data_format: str, text_field: str, heldout_fraction: float
) -> tuple[list[str], list[str]]:
    """(train, held-out) text of one file (None: the default corpus) in ``data_format``:
    documents, or each chat / prompt-response row's messages joined by newlines, split as its
    blocks are."""
    if data_format == "text":
        return split_documents(_documents(path, text_field), heldout_fraction)
    assert path is not None  # the config requires a .jsonl file for rows
    parts = split_rows(read_rows(path), heldout_fraction)
    if data_format == "chat":
        joined = [
            [
                "\n".join(str(m.get("content", "")) for m in row.get("messages") or [])
                for row in rows
            ]
            for rows in parts
        ]
    else:
        joined = [
            [f"{row.get('prompt', '')}\n{row.get('response', '')}" for row in rows]
            for rows in parts
        ]
    return joined[0], joined[1]


def _documents(path: str | None, text_field: str) -> list[str]:
    """The documents of a text source (None: the default corpus)."""
    return default_documents() if path is None else read_documents(path, text_field)


def _fraction(source: SourceConfig, config: RunConfig) -> float:
    """The share of ``source`` held out: none for a source that only trains."""
    return config.data.heldout_fraction if source.heldout else 0.0


def split_texts(config: RunConfig) -> tuple[list[str], list[str]]:
    """(train, held-out) text of ``data``, split as the blocks are. With ``data.sources``, each
    source is split on its own (in its own format); the held-out documents take every source's
    in turn."""
    fraction = config.data.heldout_fraction
    if config.data.sources:
        splits = [
            _split_file_texts(
                source.path, source.format, source.text_field, _fraction(source, config)
            )
            for source in config.data.sources
        ]
        held = [
            part[i]
            for i in range(max(len(h) for _, h in splits))
            for _, part in splits
            if i < len(part)
        ]
        return [document for train, _ in splits for document in train], held
    data_format = detect_format(config.data.path, config.data.format)
    return _split_file_texts(config.data.path, data_format, config.data.text_field, fraction)


def corpus_training_texts(config: RunConfig) -> list[str]:
    """The training split's text (never the held-out part): what a new student vocabulary is
    trained on."""
    return split_texts(config)[0]


def prepare_cross_data(
    config: RunConfig, pair: TokenizerPair | None, student_tokenizer: PreTrainedTokenizerBase
) -> tuple[Any, Any]:
    """A cross-tokenizer run's (training data, held-out data) in the student's tokenization:
    packed blocks (a list of them per source with ``data.sources``), or chat / prompt-response
    rows, encoded for both tokenizers when the teacher is used (``pair``), for the student
    alone otherwise."""
    if config.data.sources:
        return prepare_sources(config, student_tokenizer)
    data_format = detect_format(config.data.path, config.data.format)
    if data_format == "text" or pair is None:
        return prepare_data(config, student_tokenizer)
    rows = read_rows(config.data.path)
    train_rows, heldout_rows = split_rows(rows, config.data.heldout_fraction)
    block_size, source = config.data.block_size, str(config.data.path)
    train = encode_cross_examples(train_rows, data_format, pair, block_size, source)
    heldout = encode_examples(heldout_rows, data_format, student_tokenizer, block_size, source)
    return train, heldout.head(config.eval.max_blocks)


@dataclass
class TrainingData:
    """A run's data: ``train`` and ``heldout`` packed text blocks ``[n, block_size]`` (with
    ``data.sources``: every source's training rows concatenated, ``parts`` each one's) or
    encoded chat / prompt-response :class:`Examples` (also every source's, when one of
    ``data.sources`` is chat or prompt-response). With ``teachers:``, ``routes`` ``[n]`` is
    each training row's teacher (Examples also carry theirs); the held-out rows are not routed."""

    train: torch.Tensor | Examples
    heldout: torch.Tensor | Examples
    parts: list[torch.Tensor] | list[Examples] | None = None
    routes: torch.Tensor | None = None


def _pack_split(
    documents: list[str], routes: list[int] | None, routing: Routing | None, tokenizer, size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training blocks (and routes): one teacher's as :func:`pack_documents`, several's per
    teacher (:func:`pack_routed`)."""
    if routing is None or routes is None:
        return pack_documents(documents, tokenizer, size), None
    return pack_routed(documents, routes, routing, tokenizer, size)


def _read_split_pack(
    path: str | None,
    text_field: str,
    config: RunConfig,
    tokenizer,
    routing: Routing | None,
    fraction: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(train blocks, held-out blocks, train routes) of one text source (None: the default
    corpus); whole documents held out by content hash, as :func:`split_documents`. ``fraction``
    0: nothing held out (held-out blocks None)."""
    size = config.data.block_size
    if routing is None:
        documents = _documents(path, text_field)
        routes = None
    elif path is None:
        documents = default_documents()
        routes = [routing.default_index] * len(documents)
    else:
        documents, routes = read_routed_documents(path, text_field, routing)
    train, held = split_by_hash(documents, fraction, [len(doc) for doc in documents])
    train_routes = None if routes is None else [routes[i] for i in train]
    train_blocks, block_routes = _pack_split(
        [documents[i] for i in train], train_routes, routing, tokenizer, size
    )
    if fraction == 0:
        return train_blocks, None, block_routes
    heldout_blocks = pack_documents([documents[i] for i in held], tokenizer, size)
    return train_blocks, heldout_blocks, block_routes


def prepare_training_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """The run's :class:`TrainingData` (``data.format``, ``data.sources``, ``teachers:``,
    ``data.shards``: memory-mapped :class:`~distill.data.shards.TokenBlocks` for training)."""
    if config.data.shards:  # tokenized once by `distill data prepare`, checked, read on demand
        return TrainingData(*open_run_shards(config, tokenizer))
    routing = Routing.from_config(config)
    if config.data.sources:  # each source split on its own; held-out rows taken in turn
        return _prepare_sources(config, tokenizer, routing)
    data_format = detect_format(config.data.path, config.data.format)
    if data_format != "text":
        assert config.data.path is not None  # detect_format finds rows only in a file
        train, heldout = _read_split_examples(
            config.data.path, data_format, config, tokenizer, routing, config.data.heldout_fraction
        )
        assert heldout is not None  # data.heldout_fraction > 0
        return TrainingData(train, heldout.head(config.eval.max_blocks), routes=train.teachers)
    train, heldout, routes = _read_split_pack(
        config.data.path,
        config.data.text_field,
        config,
        tokenizer,
        routing,
        config.data.heldout_fraction,
    )
    assert heldout is not None  # data.heldout_fraction > 0 holds out at least one document
    return TrainingData(train, heldout[: config.eval.max_blocks], routes=routes)


def _read_split_examples(
    path: str,
    data_format: str,
    config: RunConfig,
    tokenizer,
    routing: Routing | None,
    fraction: float,
) -> tuple[Examples, Examples | None]:
    """(train, held-out) examples of one chat / prompt-response .jsonl file; whole rows held
    out by content hash (:func:`split_rows`). ``fraction`` as :func:`_read_split_pack`."""
    rows = read_rows(path)
    train_rows, heldout_rows = split_rows(rows, fraction)
    block_size = config.data.block_size
    train = encode_examples(train_rows, data_format, tokenizer, block_size, str(path), routing)
    if fraction == 0:
        return train, None
    heldout = encode_examples(heldout_rows, data_format, tokenizer, block_size, str(path))
    return train, heldout


def _prepare_sources(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, routing: Routing | None
) -> TrainingData:
    """``data.sources``: each source read in its own format and split on its own; the held-out
    rows take every source's in turn (those with ``heldout: true``), up to ``eval.max_blocks``.
    All text: packed blocks; with a chat / prompt-response source, every source as
    :class:`Examples` (text blocks as rows whose every next token is a target), so one batch
    can hold rows of every format."""
    splits: list[tuple[Any, Any, torch.Tensor | None]] = []
    for source in config.data.sources or []:
        fraction = _fraction(source, config)
        if source.format == "text":
            splits.append(
                _read_split_pack(
                    source.path, source.text_field, config, tokenizer, routing, fraction
                )
            )
        else:
            assert source.path is not None  # the config requires a .jsonl file for rows
            train, heldout = _read_split_examples(
                source.path, source.format, config, tokenizer, routing, fraction
            )
            splits.append((train, heldout, train.teachers))
    examples = any(isinstance(train, Examples) for train, _, _ in splits)
    if examples:  # prompts as the loop (on-policy) and the evaluation's samples take them
        train_prompt = config.onpolicy.prompt_tokens if config.onpolicy.lambda_ > 0 else 1
        heldout_prompt = block_prompt_tokens(config.data.block_size)
        splits = [
            (train, heldout, routes)
            if isinstance(train, Examples)
            else (
                Examples.from_blocks(train, train_prompt, routes),
                None if heldout is None else Examples.from_blocks(heldout, heldout_prompt),
                routes,
            )
            for train, heldout, routes in splits
        ]
    parts = [train for train, _, _ in splits]
    held = [heldout for _, heldout, _ in splits if heldout is not None]
    offsets = [sum(len(h) for h in held[:p]) for p in range(len(held))]
    in_turn = [
        offsets[p] + i
        for i in range(max(len(h) for h in held))
        for p in range(len(held))
        if i < len(held[p])
    ]
    rows = torch.tensor(in_turn[: config.eval.max_blocks])
    if examples:
        train = Examples.cat(parts)
        return TrainingData(train, Examples.cat(held).select(rows), parts, train.teachers)
    routes = None if routing is None else torch.cat([r for _, _, r in splits])
    return TrainingData(torch.cat(parts), torch.cat(held)[rows], parts, routes)


def prepare_sources(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``data.sources``: (each source's training blocks, held-out blocks). Every source is split
    on its own; the held-out blocks take every source's in turn, up to ``eval.max_blocks``."""
    assert config.data.sources
    data = prepare_training_data(config, tokenizer)
    assert data.parts is not None
    return data.parts, data.heldout


def prepare_data(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor] | tuple[Examples, Examples]:
    """(train, heldout): packed text blocks ``[n, block_size]``, or encoded chat /
    prompt-response :class:`Examples` (``data.format``). With ``data.sources``, the training
    blocks of every source concatenated (see :func:`prepare_sources`); with ``teachers:``,
    packed per teacher (see :func:`prepare_training_data`)."""
    data = prepare_training_data(config, tokenizer)
    return data.train, data.heldout
