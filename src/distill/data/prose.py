"""Everyday prose written by the embedded teacher, mixed into the default corpus.

The default corpus is Python documentation only, so a student trained on it alone drifts from
the teacher on everything else (the second held-out set). ``files/teacher_prose.jsonl`` holds
the embedded SmolLM2-135M-Instruct's answers to 240 prompts for everyday prose (twelve genres:
stories, letters, news, recipes, travel notes, conversations, diary entries, essays,
descriptions, how-tos, reviews, speeches; twenty subjects each), ``{"prompt", "text"}`` rows.
Made once, by ``distill generate --prompts benchmarks/data/prose_prompts.txt`` with
``generate.max_new_tokens=320``, ``generate.batch_size=16``, ``seed=0`` (temperature 0.7, top-p
0.9), keeping each response's text. None of its subjects is one of the other-domain set's
pieces, and it shares no run of 8 words with that set (tests/test_prose.py checks).

A run on the default corpus draws ``data.prose_share`` of its training rows from it
(:func:`with_default_prose`): packed into blocks like the corpus, every token a target, never
held out, so the held-out sets stay the corpus's and the other domain's.
"""

from __future__ import annotations

from pathlib import Path

from distill.config import SHIPPED_DATA, SHIPPED_PROSE, RunConfig, SourceConfig, cached_teacher

__all__ = ["shipped_prose", "with_default_prose"]


def shipped_prose() -> Path:
    """The shipped teacher-written prose (``{"prompt", "text"}`` rows)."""
    return SHIPPED_DATA / SHIPPED_PROSE


def _trains_on_default_corpus(config: RunConfig) -> bool:
    data = config.data
    return (
        config.task == "causal_lm"
        and data.path is None
        and data.sources is None
        and data.shards is None
        and data.format in ("auto", "text")
        and config.teachers is None
        and cached_teacher(config) is None  # a teacher cache holds the corpus's blocks alone
    )


def with_default_prose(config: RunConfig) -> RunConfig:
    """``config`` with ``data.sources`` = the default corpus and the shipped prose, drawn
    ``1 - share : share`` by row, when the run trains on the default corpus and
    ``data.prose_share`` > 0; otherwise ``config`` itself. Applied once, before the run saves its
    config, so the saved ``config.yaml`` names both sources and a resume compares like with
    like."""
    share = config.data.prose_share
    if share == 0 or not _trains_on_default_corpus(config):
        return config
    sources = [
        SourceConfig(),  # the default corpus, split into train / held-out as always
        SourceConfig(  # saved as shipped:teacher_prose.jsonl, the same on any install
            path=f"shipped:{SHIPPED_PROSE}",
            format="text",
            heldout=False,
            weight=share / (1 - share),
        ),
    ]
    data = config.data.model_copy(update={"sources": sources})
    return config.model_copy(update={"data": data})
