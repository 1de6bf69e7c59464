"""``teachers:``: each named teacher of a causal-LM run (live, served or cached) opened and checked
against the run's vocabulary and training rows before training."""

from __future__ import annotations

import logging

import torch

from distill.config import NamedTeacherConfig, RunConfig
from distill.data import Routing
from distill.errors import ModelError
from distill.models import load_teacher, load_teacher_tokenizer, shared_vocab_rows, teacher_source
from distill.pipelines.run_models import Models, is_reference_teacher
from distill.pipelines.training_data import TrainingData
from distill.teacher import LiveTeacher, NamedTeacher, TeacherSet
from distill.teacher.cache import MANIFEST, open_run_cache, sha256_file, weights_sha256
from distill.teacher.remote import RemoteTeacher

__all__ = ["prepare_teachers"]

log = logging.getLogger(__name__)


def _live_member(
    config: RunConfig, entry: NamedTeacherConfig, models: Models, device: torch.device
) -> NamedTeacher:
    """A live teacher: the model of ``teacher:`` when it is that one, else loaded; its tokenizer
    and output rows must cover the run's vocabulary."""
    source = teacher_source(entry)
    if is_reference_teacher(config, entry) and models.teacher is not None:
        model = models.teacher
    else:
        _check_run_tokenizer(entry, models, source)
        model = load_teacher(entry).to(device)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < models.vocab_rows:
        raise ModelError(
            f"teacher {entry.name} ({source}) has {rows} output rows, fewer than the student's "
            f"{models.vocab_rows}: every teacher must share the student's vocabulary"
        )
    teacher = LiveTeacher(model, models.vocab_rows)
    return NamedTeacher(entry.name, teacher, "live", source, weights_sha256(source))


def _check_run_tokenizer(entry: NamedTeacherConfig, models: Models, where: str) -> None:
    """One line, exit 2, unless the teacher's tokenizer is the run's (same vocabulary rows)."""
    shared_vocab_rows(
        load_teacher_tokenizer(entry),
        models.tokenizer,
        models.vocab_rows,
        models.vocab_rows,
        teacher_name=f"teacher {entry.name} ({where})",
        student_name="the run's tokenizer",
    )


def _served_member(entry: NamedTeacherConfig, models: Models) -> NamedTeacher:
    """A served teacher, asked what it serves (its vocabulary must cover the run's)."""
    remote = RemoteTeacher.from_config(entry, vocab_rows=models.vocab_rows)
    info = remote.check_server(teacher_rows=None, tokens=len(models.tokenizer))
    if entry.path is not None:  # its tokenizer, when named, must be the run's
        _check_run_tokenizer(entry, models, entry.path)
    fingerprint = f"{remote.model or ','.join(info.models)}; vocab {info.vocab_size}"
    return NamedTeacher(entry.name, remote, "url", remote.url, fingerprint)


def prepare_teachers(
    config: RunConfig, models: Models, data: TrainingData, device: torch.device
) -> TeacherSet:
    """``teachers:``: each named teacher opened and checked against the run, before training.

    Live teachers are loaded (the model of ``teacher:`` is shared, not loaded twice); served
    ones are asked what they serve; caches are checked (:func:`open_run_cache`) against the
    training blocks routed to them, as ``distill cache --teacher NAME`` writes them. Every one
    must share the student's vocabulary (a :class:`ModelError` or a cache / server error).
    """
    assert config.teachers is not None
    routing = Routing.from_config(config)
    assert routing is not None and data.routes is not None
    members = []
    for index, entry in enumerate(config.teachers):
        own_rows = int((data.routes == index).sum())
        if own_rows == 0:
            log.warning("teacher %s: no training row is routed to it", entry.name)
        if entry.url:
            members.append(_served_member(entry, models))
        elif entry.cache:
            blocks = data.train[data.routes == index]  # text blocks: the schema refuses examples
            cache = open_run_cache(
                config,
                teacher_source=teacher_source(entry),
                tokenizer=models.tokenizer,
                train_blocks=blocks,
                vocab_rows=models.vocab_rows,
                teacher=entry,
            )
            fingerprint = sha256_file(cache.directory / MANIFEST)
            members.append(NamedTeacher(entry.name, cache, "cache", str(entry.cache), fingerprint))
        else:
            members.append(_live_member(config, entry, models, device))
    return TeacherSet(members, routing.default)
