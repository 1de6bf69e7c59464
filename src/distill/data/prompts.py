"""Prompt files (``generate.prompts``): one prompt per non-blank line of a .txt file, or chat
``messages`` / ``prompt`` rows of a .jsonl file; and the prompt set that ships with distill."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.config import SHIPPED_DATA
from distill.data.chat import check_messages
from distill.errors import DataError
from distill.io import jsonl_objects, text_lines

__all__ = ["Prompt", "default_prompts_path", "read_prompts"]


@dataclass(frozen=True)
class Prompt:
    """One prompt: chat ``messages`` (a .jsonl row with them) or plain ``text``."""

    index: int
    where: str  # file:line, for errors
    messages: list[dict[str, str]] | None = None
    text: str | None = None


def default_prompts_path() -> Path:
    """The shipped prompt set: short instructions of many kinds (``distill/data/files``)."""
    return SHIPPED_DATA / "prompts.jsonl"


def _prompt_row(row: Any, index: int, where: str) -> Prompt:
    if not isinstance(row, dict) or ("messages" not in row and "prompt" not in row):
        raise DataError(f"{where}: expected a JSON object with `messages` or `prompt`")
    if "messages" in row:
        messages = check_messages(row["messages"], where)
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the last message must be the user's (the teacher answers)")
        return Prompt(index, where, messages=messages)
    text = row["prompt"]
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: `prompt` must be non-empty text")
    return Prompt(index, where, text=text)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a .txt file (one per non-blank line) or a .jsonl file (``messages`` or
    ``prompt`` rows, blank lines skipped); a DataError naming file:line for a bad row."""
    file = Path(path)
    if file.suffix not in (".txt", ".jsonl"):
        raise DataError(f"generate.prompts {file}: expected a .txt or .jsonl file")
    if not file.is_file():
        raise DataError(f"generate.prompts {file} does not exist")
    prompts: list[Prompt] = []
    if file.suffix == ".jsonl":
        for line_number, row in jsonl_objects(file):
            prompts.append(_prompt_row(row, len(prompts), f"{file}:{line_number}"))
    else:
        for line_number, line in enumerate(text_lines(file), start=1):
            if line.strip():
                text = line.rstrip("\r\n")
                prompts.append(Prompt(len(prompts), f"{file}:{line_number}", text=text))
    if not prompts:
        raise DataError(f"generate.prompts {file}: no prompts")
    return prompts
