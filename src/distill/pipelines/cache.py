"""``distill cache``: run the teacher once over the training blocks and store its top-k."""

from __future__ import annotations

import torch

from distill.config import RunConfig
from distill.data import check_data_source
from distill.errors import ConfigError
from distill.models import load_teacher, load_teacher_tokenizer, teacher_source
from distill.pipelines.prepare import prepare_training_data
from distill.teacher.cache_writer import cache_identity, write_cache

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
    data = prepare_training_data(config, tokenizer)
    train_blocks = data.train
    if index is not None:
        train_blocks = train_blocks[data.routes == index]
        if not len(train_blocks):
            raise ConfigError(f"distill cache --teacher {teacher_name}: no training row is its")
    model = load_teacher(section)
    cache = config.cache
    return write_cache(
        model,
        train_blocks,
        section.cache,
        identity=cache_identity(source, model, tokenizer, train_blocks),
        k=cache.k,
        dtype=cache.dtype,
        temperatures=[*cache.temperatures, config.loss.temperature],
        shard_blocks=cache.shard_blocks,
        batch_size=cache.batch_size,
    )


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
