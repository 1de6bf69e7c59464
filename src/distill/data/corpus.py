"""Documents in, a deterministic train / held-out split out.

A document is one string: a pydoc topic, a .txt file's paragraph block, or a row's text field.
The held-out split takes whole documents, ordered by a hash of their content, until it holds the
requested share of characters, so it never changes with file order or seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from distill.errors import DataError
from distill.io import jsonl_objects, read_text

if TYPE_CHECKING:
    from distill.data.routing import Routing

__all__ = [
    "DOCUMENT_SUFFIXES",
    "data_files",
    "default_documents",
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


def split_by_hash(
    keys: list[str], heldout_fraction: float, sizes: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), each in input order. Items join the held-out part in
    the order of their content hash (``keys``) until it holds ``heldout_fraction`` of the total
    size (``sizes``; default 1 per item), keeping at least one item for training. The split
    never changes with file order or seed."""
    sizes = [1] * len(keys) if sizes is None else sizes
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    target = heldout_fraction * sum(sizes)
    heldout: set[int] = set()
    held_size = 0
    for index in order:
        if held_size >= target or len(heldout) == len(keys) - 1:
            break
        heldout.add(index)
        held_size += sizes[index]
    return [i for i in range(len(keys)) if i not in heldout], sorted(heldout)


def split_documents(documents: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout): whole documents, held-out up to ``heldout_fraction`` of the characters."""
    train, heldout = split_by_hash(documents, heldout_fraction, [len(doc) for doc in documents])
    return [documents[i] for i in train], [documents[i] for i in heldout]
