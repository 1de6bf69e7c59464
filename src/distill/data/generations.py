"""The resumable record file ``distill generate`` writes: one JSON record per line, keyed by
``id``; a partial last line (a write cut off by a kill) dropped on reading; the settings it was
written with kept beside it (``<output>.meta.json``), so a resume with other settings is refused;
records rewritten in id order once complete."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from distill.errors import ConfigError, DataError
from distill.io import atomic_write_bytes, atomic_write_json

__all__ = ["check_meta", "meta_path", "read_existing", "sort_by_id"]

log = logging.getLogger(__name__)


def read_existing(path: Path, n_prompts: int) -> dict[int, dict]:
    """Records already in ``path`` by id. A truncated or unparsable last line (a write cut off
    by a kill) is dropped and the file rewritten without it; any other bad line is a DataError."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: after the last newline (b"" if none)
    records: dict[int, dict] = {}
    drop_last = bool(tail)
    for line_number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if line_number == len(complete) and not tail:
                drop_last = True
                complete = complete[:-1]
                break
            raise DataError(
                f"{path}:{line_number}: not valid JSON (and not a partial last line)"
            ) from None
        index = record.get("id") if isinstance(record, dict) else None
        if not isinstance(index, int) or not 0 <= index < n_prompts or index in records:
            raise DataError(
                f"{path}:{line_number}: record id {index!r} is not a new prompt index "
                f"in [0, {n_prompts})"
            )
        records[index] = record
    if drop_last:
        log.warning("%s: dropping a partial last line (an interrupted write)", path)
        kept = b"".join(raw + b"\n" for raw in complete)
        atomic_write_bytes(path, kept)
    return records


def meta_path(output: Path) -> Path:
    """Where the settings ``output`` was written with are kept."""
    return output.with_name(output.name + ".meta.json")


# A file's location and the key that identifies its content: a moved file with the same content
# (another checkout, a copied run folder) resumes.
_CONTENT_OF = {"prompts": "prompts_sha256", "corpus": "corpus_fingerprint"}


def _same_content(key: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    content = _CONTENT_OF.get(key)
    return content is not None and new.get(content) is not None and old.get(content) == new[content]


def check_meta(output: Path, meta: dict[str, Any], has_records: bool) -> None:
    """Write ``meta`` beside a new output; refuse to resume one written with other settings."""
    meta_file = meta_path(output)
    if has_records:
        if not meta_file.is_file():
            raise ConfigError(
                f"{output} holds records but no {meta_file.name}, so its settings are unknown; "
                "delete it or write elsewhere (--out)"
            )
        try:
            old = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(
                f"{meta_file}: not valid JSON; delete the output or write elsewhere (--out)"
            ) from None
        changed = [
            f"{key}={old.get(key)!r} (now {value!r})"
            for key, value in meta.items()
            if old.get(key) != value and not _same_content(key, old, meta)
        ]
        if changed:
            raise ConfigError(
                f"{output} was written with other settings: {', '.join(changed)}; "
                "resume with the same settings, or write elsewhere (--out)"
            )
    atomic_write_json(meta_file, meta)


def sort_by_id(path: Path) -> None:
    """Rewrite a finished output in prompt order (records are appended in batch order)."""
    with path.open(encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    ordered = sorted(records, key=lambda record: record["id"])
    if ordered != records:
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in ordered).encode("utf-8"))
