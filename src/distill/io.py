"""Atomic file and directory writes (a crash never leaves a half-written result behind), and
strict UTF-8 reading of text and JSON-lines files (a bad byte is a one-line DataError)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.errors import DataError

__all__ = [
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_directory",
    "append_jsonl",
    "jsonl_objects",
    "read_jsonl",
    "read_text",
    "text_lines",
]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file ``.NAME.*.tmp`` beside ``path``, fsync it, rename over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces ``path`` whole, on failure it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(tmp_dir, 0o755)
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp_dir, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, target)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a line is either whole or absent)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _not_utf8(path: str | Path, offset: int, byte: int) -> DataError:
    return DataError(
        f"{path}: not UTF-8 text: byte 0x{byte:02x} at byte offset {offset}; "
        "re-encode the file as UTF-8"
    )


def read_text(path: str | Path) -> str:
    """The whole file decoded as strict UTF-8; a bad byte is a :class:`DataError` naming the file
    and the byte offset of the first bad byte (never a UnicodeDecodeError traceback)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err.start, data[err.start]) from None


def text_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, streamed, each with its line ending (as ``open(...,
    newline="")`` gives them, so ``csv`` can read them); a bad byte is a :class:`DataError` as in
    :func:`read_text`. Splitting the bytes at ``\\n`` is safe: UTF-8 never uses 0x0a inside a
    multi-byte character."""
    offset = 0
    with Path(path).open("rb") as handle:
        for raw in handle:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start, raw[err.start]) from None
            offset += len(raw)


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for each non-blank line of a .jsonl file; a line that is not a
    JSON object (or not UTF-8) is a :class:`DataError` naming the file and where."""
    file = Path(path)
    for line_number, line in enumerate(text_lines(file), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{file}:{line_number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise DataError(f"{file}:{line_number}: expected a JSON object")
        yield line_number, row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every object of a .jsonl file (see :func:`jsonl_objects`); a missing file gives ``[]``."""
    return [row for _, row in jsonl_objects(path)] if Path(path).is_file() else []
