"""``distill cache``: run the teacher once over the training blocks and store its top-k.

With ``loss.cross_tokenizer`` the blocks are the teacher's side of the cross-tokenizer run's
rows (the student's rows in its own tokenization, aligned for the teacher exactly as the run
aligns them), so the run reads the teacher's outputs at the very rows it scores."""

from __future__ import annotations

import torch

from distill.config import RunConfig
from distill.data import check_data_source
from distill.data.alignment import check_tokenizer_pair
from distill.data.cross_tokenizer import TokenizerPair
from distill.errors import ConfigError
from distill.models import load_teacher, load_teacher_tokenizer, teacher_source, tokenizer_rows
from distill.pipelines.run_models import resolve_student_tokenizer
from distill.pipelines.training_data import prepare_cross_data, prepare_training_data
from distill.teacher.cache import tokenizer_sha256
from distill.teacher.cache_writer import cache_identity, write_cache
from distill.train.cross_tokenizer import teacher_rows

__all__ = ["cache_job"]


def cache_job(config: RunConfig, teacher_name: str | None = None) -> bool:
    """``distill cache``: the teacher's top-k over the run's training blocks into teacher.cache.

    ``teacher_name`` (``--teacher``, with ``teachers:``): that teacher's top-k over the training
    blocks routed to it, into its own ``cache`` key."""
    index = _named_index(config, teacher_name)
    section = config.teacher if index is None else config.teachers[index]
    if not section.cache:
        where = "teacher.cache=DIR (or --out DIR)" if index is None else f"teachers[{index}].cache"
        raise ConfigError(f"distill cache: set {where}: where to write")
    check_data_source(config)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    source = teacher_source(section)
    tokenizer = load_teacher_tokenizer(config.teacher)
    if config.loss.cross_tokenizer:
        return _cross_tokenizer_cache(config, source, tokenizer)
    data = prepare_training_data(config, tokenizer)
    train_blocks = data.train
    if index is not None:
        train_blocks = train_blocks[data.routes == index]
        if not len(train_blocks):
            raise ConfigError(f"distill cache --teacher {teacher_name}: no training row is its")
    model = load_teacher(section)
    identity = cache_identity(source, model, tokenizer, train_blocks)
    return _write(config, model, train_blocks, section.cache, identity)


def _write(config: RunConfig, model, blocks: torch.Tensor, directory: str, identity: dict) -> bool:
    """Write (or resume) the cache of ``blocks`` with the ``cache`` section's settings."""
    cache = config.cache
    return write_cache(
        model,
        blocks,
        directory,
        identity=identity,
        k=cache.k,
        dtype=cache.dtype,
        temperatures=[*cache.temperatures, config.loss.temperature],
        shard_blocks=cache.shard_blocks,
        batch_size=cache.batch_size,
    )


def _cross_tokenizer_cache(config: RunConfig, source: str, tokenizer) -> bool:
    """The teacher's top-k and realised tokens over its side of every training row of the
    cross-tokenizer run (:func:`~distill.train.cross_tokenizer.teacher_rows`), over its
    tokenizer's rows; the manifest names the student's tokenizer and the pad."""
    student_tokenizer, student_name = resolve_student_tokenizer(config, tokenizer, source)
    check_tokenizer_pair(tokenizer, student_tokenizer, source, student_name)
    pair = TokenizerPair(tokenizer, student_tokenizer)
    rows = teacher_rows(prepare_cross_data(config, pair, student_tokenizer)[0], pair)
    model = load_teacher(config.teacher)
    identity = cache_identity(source, model, tokenizer, rows)
    identity["teacher"]["vocab_rows"] = tokenizer_rows(model, tokenizer, source)
    identity["cross_tokenizer"] = {
        "student_tokenizer": student_name,
        "student_tokenizer_sha256": tokenizer_sha256(student_tokenizer),
        "teacher_pad": pair.teacher_pad,
    }
    return _write(config, model, rows, config.teacher.cache, identity)


def _named_index(config: RunConfig, teacher_name: str | None) -> int | None:
    """The index of ``teacher_name`` in ``teachers:`` (None: the one teacher of ``teacher:``)."""
    names = [entry.name for entry in config.teachers or []]
    if teacher_name is None:
        if names:
            raise ConfigError(
                f"distill cache: this config has teachers ({', '.join(names)}): name the one "
                "to cache with --teacher NAME"
            )
        return None
    if teacher_name not in names:
        raise ConfigError(
            f"distill cache --teacher {teacher_name}: not one of teachers "
            f"({', '.join(names) or 'none set'})"
        )
    return names.index(teacher_name)
