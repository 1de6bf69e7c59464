"""``distill cache``: run the teacher once over the training blocks and store its top-k."""

from __future__ import annotations

import torch

from distill.config import RunConfig
from distill.data import check_data_source
from distill.errors import ConfigError
from distill.models import load_teacher, load_teacher_tokenizer, teacher_source
from distill.pipelines.prepare import prepare_data
from distill.teacher.cache_writer import cache_identity, write_cache

__all__ = ["cache_job"]


def cache_job(config: RunConfig) -> bool:
    """``distill cache``: the teacher's top-k over the run's training blocks into teacher.cache."""
    if not config.teacher.cache:
        raise ConfigError("distill cache: set teacher.cache=DIR (or --out DIR): where to write")
    check_data_source(config)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    source = teacher_source(config.teacher)
    tokenizer = load_teacher_tokenizer(config.teacher)
    train_blocks, _ = prepare_data(config, tokenizer)
    model = load_teacher(config.teacher)
    cache = config.cache
    return write_cache(
        model,
        train_blocks,
        config.teacher.cache,
        identity=cache_identity(source, model, tokenizer, train_blocks),
        k=cache.k,
        dtype=cache.dtype,
        temperatures=[*cache.temperatures, config.loss.temperature],
        shard_blocks=cache.shard_blocks,
        batch_size=cache.batch_size,
    )
