"""The shipped teacher-written prose: what it holds, and when a run mixes it into the corpus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from distill.config import SourceConfig, load_config
from distill.data.extra import extra_sources
from distill.data.prose import shipped_prose, with_default_prose
from distill.pipelines.run import distill, resume_config

ROOT = Path(__file__).resolve().parent.parent
SHARED_RUN = 8  # words: a run this long shared with a held-out set would be copied text


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _rows() -> list[dict]:
    return [json.loads(line) for line in shipped_prose().read_text(encoding="utf-8").splitlines()]


def test_shipped_prose_answers_the_benchmark_prompts():
    prompts = (ROOT / "benchmarks" / "data" / "prose_prompts.txt").read_text().splitlines()
    rows = _rows()
    assert [row["prompt"] for row in rows] == prompts
    assert all(len(_words(row["text"])) >= 20 for row in rows)


def test_shipped_prose_shares_no_text_with_the_other_domain_set():
    held = _words(next(iter(extra_sources(None).values())).read_text(encoding="utf-8"))
    held_runs = {tuple(held[i : i + SHARED_RUN]) for i in range(len(held) - SHARED_RUN + 1)}
    shared = [
        run
        for row in _rows()
        for words in [_words(row["text"])]
        for i in range(len(words) - SHARED_RUN + 1)
        if (run := tuple(words[i : i + SHARED_RUN])) in held_runs
    ]
    assert len(held_runs) > 2000  # the set was read
    assert shared == []


@pytest.mark.parametrize("share", [0.1, 0.25])
def test_default_corpus_run_draws_the_share_from_the_prose(share):
    config = with_default_prose(load_config(overrides=[f"data.prose_share={share}"]))
    corpus, prose = config.data.sources
    assert corpus == SourceConfig()  # the default corpus, held-out split as always
    assert (prose.path, prose.format, prose.heldout) == (str(shipped_prose()), "text", False)
    assert prose.weight / (corpus.weight + prose.weight) == pytest.approx(share, abs=1e-12)


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.prose_share=0"],
        ["data.path=corpus.txt"],
        ["teacher.cache=runs/cache"],
        ["data.sources=[{path: a.txt}]"],
    ],
)
def test_prose_joins_the_default_corpus_only(overrides):
    config = load_config(overrides=overrides)
    assert with_default_prose(config) is config


def test_run_trains_on_both_and_resumes_from_the_plain_config(tiny_run_config, tmp_path):
    result = distill(tiny_run_config)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert [source["path"] for source in saved["data"]["sources"]] == [None, str(shipped_prose())]
    corpus_blocks, prose_blocks = result.report["plan"]["train_blocks_per_source"]
    assert corpus_blocks > 0 and prose_blocks > 0
    # the user's own config names no sources: resolved as the saved one was, nothing differs
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(tiny_run_config))
    resumed = resume_config(result.run_dir, plain)
    assert resumed.data.sources == load_config(result.run_dir / "config.yaml").data.sources
