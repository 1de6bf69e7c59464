"""Documents in, a deterministic train / held-out split out.

A document is one string: a pydoc topic, a .txt file's paragraph block, or a row's text field.
The held-out split takes whole documents, ordered by a hash of their content, until it holds the
requested share of characters, so it never changes with file order or seed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from distill.errors import DataError
from distill.io import jsonl_objects, read_text

__all__ = ["DOCUMENT_SUFFIXES", "default_documents", "read_documents", "split_documents"]

DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_documents() -> list[str]:
    """CPython's ``pydoc_data.topics``: about 465k characters of English prose about Python."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
    for line_number, row in jsonl_objects(path):
        if text_field not in row:
            raise DataError(f"{path}:{line_number}: row has no '{text_field}' field")
        documents.append(str(row[text_field]))
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


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Documents from a .txt/.jsonl/.parquet file, or every such file in a directory (sorted)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    files = (
        sorted(p for p in root.rglob("*") if p.suffix in DOCUMENT_SUFFIXES)
        if root.is_dir()
        else [root]
    )
    if not files:
        raise DataError(f"data directory {root} holds no {'/'.join(DOCUMENT_SUFFIXES)} files")
    documents: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            documents += _read_jsonl(file, text_field)
        elif file.suffix == ".parquet":
            documents += _read_parquet(file, text_field)
        elif file.suffix == ".txt":
            documents += _read_txt(file)
        else:
            raise DataError(f"data file {file}: expected .txt, .jsonl or .parquet")
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise DataError(f"data path {root} holds no text")
    return documents


def split_documents(documents: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout): whole documents, held-out chosen by content hash up to the char share."""
    order = sorted(
        range(len(documents)),
        key=lambda i: hashlib.sha256(documents[i].encode("utf-8")).hexdigest(),
    )
    target_chars = heldout_fraction * sum(len(doc) for doc in documents)
    heldout_ids: set[int] = set()
    heldout_chars = 0
    for index in order:
        if heldout_chars >= target_chars or len(heldout_ids) == len(documents) - 1:
            break
        heldout_ids.add(index)
        heldout_chars += len(documents[index])
    train = [doc for i, doc in enumerate(documents) if i not in heldout_ids]
    heldout = [doc for i, doc in enumerate(documents) if i in heldout_ids]
    return train, heldout
