"""The data checks a job runs first, before any model loads: the ones that need the data files
(the config schema, :mod:`distill.config`, already refused what the config alone decides).

A missing ``data.path``, a file of the wrong kind, a byte that is not UTF-8, chat /
prompt-response rows (``data.format=auto``) next to a ``teacher.cache``, or a row routed to a
teacher the run does not have (``teachers:``) would otherwise surface only after the teacher has
loaded and a layer search may have run for minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from distill.config import teacher_sections
from distill.data.corpus import DOCUMENT_SUFFIXES, data_files
from distill.data.examples import detect_format
from distill.data.extra import extra_sources
from distill.data.routing import Routing, check_routes
from distill.errors import ConfigError, DataError
from distill.io import text_lines

if TYPE_CHECKING:
    from distill.config import RunConfig

__all__ = ["check_data_source"]

_LABELLED_SUFFIXES = (".csv", ".jsonl")
_TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")  # read as UTF-8 text (parquet is binary)


def check_data_source(config: RunConfig) -> None:
    """Refuse ``config.data`` before any model loads: ``data.path`` must exist, hold files of
    the kind ``task`` reads, all valid UTF-8 (a :class:`DataError` naming the file and the byte
    offset of the first bad byte), and chat / prompt-response rows found by ``data.format=auto``
    cannot be trained from ``teacher.cache`` (a :class:`ConfigError`). Reads every text file
    once; the default corpus (no ``data.path``) needs no check. ``eval.extra_data`` paths
    must exist and be text files too. With ``teachers:``, every .jsonl row's ``teacher`` field
    must name one of them (a :class:`DataError` naming the file and line)."""
    if config.task == "causal_lm" and config.eval.extra_data:
        for path in extra_sources(config.eval.extra_data).values():
            for file in data_files(path, DOCUMENT_SUFFIXES):
                _check_utf8(file)
    routing = Routing.from_config(config)
    for source in config.data.sources or []:
        if source.path is None:  # the default corpus
            continue
        files = data_files(source.path, DOCUMENT_SUFFIXES)
        for file in files:
            _check_utf8(file)
        if routing is not None:
            check_routes(files, routing)
    if config.data.path is None:
        return
    suffixes = _LABELLED_SUFFIXES if config.task == "classification" else DOCUMENT_SUFFIXES
    files = data_files(config.data.path, suffixes)
    for file in files:
        _check_utf8(file)
    if config.task == "causal_lm":
        _check_examples(config)
        if routing is not None:
            check_routes(files, routing)


def _check_utf8(file: Path) -> None:
    if file.suffix in _TEXT_SUFFIXES:
        for _ in text_lines(file):  # raises DataError at the first bad byte
            pass


def _check_examples(config: RunConfig) -> None:
    """Chat / prompt-response data (as ``data.format`` or the first .jsonl row says) must be one
    .jsonl file and cannot come from a teacher cache of packed text blocks (a cross-tokenizer
    cache, ``loss.cross_tokenizer``, holds the teacher's side of whatever rows the run aligns)."""
    data_format = detect_format(config.data.path, config.data.format)
    if data_format == "text":
        return
    path = Path(config.data.path)
    if path.suffix != ".jsonl" or not path.is_file():
        raise DataError(f"data.path {path}: chat and prompt/response data must be a .jsonl file")
    cached = next((key for key, section in teacher_sections(config) if section.cache), None)
    if cached and config.loss.cross_tokenizer is None:
        raise ConfigError(
            f"data.path {path} holds {data_format} rows, and {cached}.cache holds packed text "
            f"blocks: it cannot serve chat or prompt/response data; unset {cached}.cache"
        )
