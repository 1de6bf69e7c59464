"""Several named teachers in one run (``teachers:``): each row of a batch is distilled from its own.

A :class:`TeacherSet` holds the run's teachers in the order of their names (a row's route is an
index into it), each a live model, a cache or a server behind the same
:class:`~distill.teacher.Teacher` protocol. The causal-LM task splits a micro-batch by route and
asks each teacher for its rows only (``distill.train.causal_lm.routed_batch_terms``), so a batch
may mix a live teacher's full logits with a server's top-k.

The run directory keeps a manifest of its teachers (``teachers.json``: names, where each lives,
a fingerprint of what it serves); a resume whose teachers differ from it is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.errors import ConfigError, ModelError
from distill.io import atomic_write_json
from distill.losses.sparse import SparseTargets

__all__ = ["NamedTeacher", "TeacherSet", "MANIFEST", "check_resume_teachers"]

MANIFEST = "teachers.json"


@dataclass
class NamedTeacher:
    """One teacher of a set: its ``teacher`` (the protocol), what kind it is (live, cache,
    url), where it lives (a model path, a cache directory, a URL) and a ``fingerprint`` of what
    it serves (sha256 of the weights or of the cache manifest; the served model and vocabulary)."""

    name: str
    teacher: Any  # a distill.teacher.Teacher
    kind: str
    where: str
    fingerprint: str


class TeacherSet:
    """The run's teachers; route ``i`` is ``members[i]``, unrouted rows go to ``default``.

    Every member must give soft targets over the same ``vocab_rows`` (the student's shared
    vocabulary): a :class:`ModelError` otherwise.
    """

    def __init__(self, members: list[NamedTeacher], default: str):
        names = [member.name for member in members]
        if not members or len(set(names)) != len(names) or default not in names:
            raise ValueError(f"teachers {names}: distinct names, default {default!r} among them")
        rows = {member.name: member.teacher.vocab_rows for member in members}
        if len(set(rows.values())) != 1:
            raise ModelError(
                f"teachers give soft targets over different vocabularies ({rows} rows): every "
                "teacher must share the student's vocabulary"
            )
        self.members = members
        self.default = default
        self.vocab_rows: int = next(iter(rows.values()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(member.name for member in self.members)

    @property
    def default_index(self) -> int:
        return self.names.index(self.default)

    def __len__(self) -> int:
        return len(self.members)

    def soft_targets(self, index: int, input_ids: torch.Tensor) -> torch.Tensor | SparseTargets:
        """Teacher ``index``'s soft targets for ``input_ids`` ``[b, T]`` (its rows only)."""
        return self.members[index].teacher.soft_targets(input_ids)

    def round_trips(self, rows: dict[int, torch.Tensor]) -> dict[str, float]:
        """Seconds each teacher takes to answer its warm-up rows (``rows[index]`` ``[b, T]``;
        a teacher without rows there is left out): the plan's round-trip times."""
        seconds = {}
        for index, input_ids in rows.items():
            start = time.perf_counter()
            self.soft_targets(index, input_ids)
            seconds[self.members[index].name] = time.perf_counter() - start
        return seconds

    def manifest(self) -> dict[str, Any]:
        """What ``teachers.json`` records: the default and, per teacher, kind, where, fingerprint."""
        return {
            "default": self.default,
            "teachers": [
                {"name": m.name, "kind": m.kind, "where": m.where, "fingerprint": m.fingerprint}
                for m in self.members
            ],
        }

    def close(self) -> None:
        """Stop served teachers' request threads and drop every teacher (frees live models)."""
        for member in self.members:
            close = getattr(member.teacher, "close", None)
            if close is not None:
                close()
            member.teacher = None


def _describe(manifest: dict[str, Any] | None) -> str:
    if manifest is None:
        return "one teacher (no teachers:)"
    return (
        ", ".join(
            f"{t['name']} ({t['kind']} {t['where']}, {t['fingerprint'][:12]})"
            for t in manifest["teachers"]
        )
        + f"; default {manifest['default']}"
    )


def check_resume_teachers(
    run_dir: str | Path, manifest: dict[str, Any] | None, *, resuming: bool, write: bool = True
) -> None:
    """Refuse to resume ``run_dir`` with teachers other than those it trained with (one line
    naming both sets), then (``write``: one process of a run) record ``manifest`` (the set's;
    None: one teacher) in it.

    A resume is checked only once the run has a checkpoint; a fresh run writes the manifest (or,
    with one teacher, removes a stale one)."""
    path = Path(run_dir) / MANIFEST
    saved = json.loads(path.read_text()) if path.is_file() else None
    trained = any((Path(run_dir) / "checkpoints").glob("step-*"))
    if resuming and trained and saved != manifest:
        raise ConfigError(
            f"--resume {run_dir}: its teachers changed: it trained with {_describe(saved)}; "
            f"this run has {_describe(manifest)} (start a new run to change teachers)"
        )
    if not write:
        return
    if manifest is not None:
        atomic_write_json(path, manifest)
    elif path.is_file():
        path.unlink()
