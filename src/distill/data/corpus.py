"""Documents in, a deterministic train / held-out split out.

A document is one string: a pydoc topic, a .txt file's paragraph block, or a row's text field.
The held-out split takes whole documents, ordered by a hash of their content, until it holds the
requested share of characters, so it never changes with file order or seed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distill.errors import DataError
from distill.io import jsonl_objects, read_text

if TYPE_CHECKING:
    from distill.data.routing import Routing

__all__ = [
    "DOCUMENT_SUFFIXES",
    "CorpusSplit",
    "corpus_split",
    "data_files",
    "default_documents",
    "heldout_mask",
    "iter_documents",
    "read_documents",
    "read_routed_documents",
    "split_by_hash",
    "split_documents",
]

DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_documents() -> list[str]:
    """CPython's ``pydoc_data.topics``: about 465k characters of English prose about Python."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _read_jsonl(
    path: Path, text_field: str, routing: Routing | None = None
) -> list[tuple[str, int | None]]:
    """(text, route) of each row; the route is None without ``routing``."""
    documents = []
    for line_number, row in jsonl_objects(path):
        if text_field not in row:
            raise DataError(f"{path}:{line_number}: row has no '{text_field}' field")
        route = None if routing is None else routing.of_row(row, f"{path}:{line_number}")
        documents.append((str(row[text_field]), route))
    return documents


def _read_parquet(path: Path, text_field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'distill[data]'") from None
    table = pq.read_table(path)
    if text_field not in table.column_names:
        raise DataError(f"{path}: no '{text_field}' column (columns: {table.column_names})")
    return [str(value) for value in table.column(text_field).to_pylist() if value is not None]


def _read_txt(path: Path) -> list[str]:
    """Paragraph blocks separated by blank lines, so the held-out split can take whole ones."""
    text = read_text(path)
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def data_files(root: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files a reader of ``suffixes`` takes from ``root``: the file itself, or every such
    file under a directory (sorted); a missing path, another kind of file or an empty directory
    is a :class:`DataError`."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.path {root} does not exist")
    if not root.is_dir():
        if root.suffix not in suffixes:
            raise DataError(f"data file {root}: expected {' or '.join(suffixes)}")
        return [root]
    files = sorted(p for p in root.rglob("*") if p.suffix in suffixes)
    if not files:
        raise DataError(f"data directory {root} holds no {'/'.join(suffixes)} files")
    return files


def _documents(
    path: str | Path, text_field: str, routing: Routing | None
) -> list[tuple[str, int | None]]:
    """(document, route) of every file of ``path``: .jsonl rows route by their ``teacher``
    field, other files' documents by ``routing``'s default (None without ``routing``)."""
    default = None if routing is None else routing.default_index
    documents: list[tuple[str, int | None]] = []
    for file in data_files(path, DOCUMENT_SUFFIXES):
        if file.suffix == ".jsonl":
            documents += _read_jsonl(file, text_field, routing)
        elif file.suffix == ".parquet":
            documents += [(doc, default) for doc in _read_parquet(file, text_field)]
        else:
            documents += [(doc, default) for doc in _read_txt(file)]
    documents = [(doc, route) for doc, route in documents if doc.strip()]
    if not documents:
        raise DataError(f"data path {path} holds no text")
    return documents


def _stream_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'distill[data]'") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no '{text_field}' column (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(columns=[text_field]):
        yield from (str(value) for value in batch.column(0).to_pylist() if value is not None)


def iter_documents(path: str | Path | None, text_field: str = "text") -> Iterator[str]:
    """The documents of :func:`read_documents` (None: the default corpus), in the same order,
    streamed: .jsonl and .parquet row by row, a .txt file whole (memory: the largest .txt file).
    A path without text yields nothing (the caller says so)."""
    if path is None:
        yield from default_documents()
        return
    for file in data_files(path, DOCUMENT_SUFFIXES):
        if file.suffix == ".jsonl":
            texts: Iterator[str] = (
                str(row[text_field])
                for row in _checked_rows(file, text_field)  # DataError naming file:line
            )
        elif file.suffix == ".parquet":
            texts = _stream_parquet(file, text_field)
        else:
            texts = iter(_read_txt(file))
        yield from (text for text in texts if text.strip())


def _checked_rows(path: Path, text_field: str) -> Iterator[dict]:
    for line_number, row in jsonl_objects(path):
        if text_field not in row:
            raise DataError(f"{path}:{line_number}: row has no '{text_field}' field")
        yield row


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a .txt/.jsonl/.parquet file, or every such file in a directory (sorted)."""
    return [doc for doc, _ in _documents(path, text_field, None)]


def read_routed_documents(
    path: str | Path, text_field: str, routing: Routing
) -> tuple[list[str], list[int]]:
    """(documents, each one's teacher route), read as :func:`read_documents`; a .jsonl row whose
    ``teacher`` is not one of ``routing.names`` is a DataError naming its file and line."""
    documents = _documents(path, text_field, routing)
    return [doc for doc, _ in documents], [int(route) for _, route in documents]


def heldout_mask(
    digests: bytes, heldout_fraction: float, sizes: np.ndarray | list[int]
) -> np.ndarray:
    """Which items are held out ``[n]`` (bool), given each one's sha256 ``digests`` (32 bytes
    each, concatenated) and size: items join the held-out part in digest order (ties by index)
    until it holds ``heldout_fraction`` of the total size, keeping at least one for training.
    Memory is under 100 bytes per item, so a prepare pass can split millions of documents."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    if len(digests) != 32 * n:
        raise ValueError(f"{len(digests)} digest bytes for {n} items (32 each expected)")
    held = np.zeros(n, dtype=bool)
    if n == 0:
        return held
    words = np.frombuffer(digests, dtype=">u8").reshape(n, 4)  # big-endian: byte order = hex order
    order = np.lexsort((np.arange(n), words[:, 3], words[:, 2], words[:, 1], words[:, 0]))
    target = heldout_fraction * int(sizes.sum())
    size_before = np.concatenate([[0], np.cumsum(sizes[order])[:-1]])  # held size before each
    reached = np.flatnonzero(size_before >= target)
    count = min(int(reached[0]) if len(reached) else n, n - 1)
    held[order[:count]] = True
    return held


def split_by_hash(
    keys: list[str], heldout_fraction: float, sizes: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), each in input order. Items join the held-out part in
    the order of their content hash (``keys``) until it holds ``heldout_fraction`` of the total
    size (``sizes``; default 1 per item), keeping at least one item for training. The split
    never changes with file order or seed (see :func:`heldout_mask`)."""
    sizes = [1] * len(keys) if sizes is None else sizes
    digests = b"".join(hashlib.sha256(key.encode()).digest() for key in keys)
    held = heldout_mask(digests, heldout_fraction, sizes)
    return np.flatnonzero(~held).tolist(), np.flatnonzero(held).tolist()


@dataclass
class CorpusSplit:
    """Pass 1 over the corpus: the held-out mask ``[n]``, each document's length in
    characters ``[n]``, and a fingerprint (sha256 of every document's sha256, in order)."""

    heldout: np.ndarray
    sizes: np.ndarray
    fingerprint: str


def corpus_split(documents: Iterable[str], heldout_fraction: float, where: str) -> CorpusSplit:
    """The split of :func:`split_documents` from one streamed pass: every document hashed once,
    its text not kept (``where`` names the corpus in the error for one without text)."""
    digests = bytearray()
    sizes = array("q")  # 8 bytes per document
    for document in documents:
        digests += hashlib.sha256(document.encode()).digest()
        sizes.append(len(document))
    if not sizes:
        raise DataError(f"data path {where} holds no text")
    held = heldout_mask(bytes(digests), heldout_fraction, sizes)
    return CorpusSplit(held, np.asarray(sizes, dtype=np.int64), hashlib.sha256(digests).hexdigest())


def split_documents(documents: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout): whole documents, held-out up to ``heldout_fraction`` of the characters."""
    train, heldout = split_by_hash(documents, heldout_fraction, [len(doc) for doc in documents])
    return [documents[i] for i in train], [documents[i] for i in heldout]
