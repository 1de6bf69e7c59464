"""The shipped teacher-written prose: what it holds, and when a run mixes it into the corpus."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from distill.config import SHIPPED_DATA, SourceConfig, load_config
from distill.data.extra import extra_sources
from distill.data.prose import shipped_prose, with_default_prose
from distill.errors import ConfigError
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
    # named portably, not by this install's path
    assert [source["path"] for source in saved["data"]["sources"]] == [
        None,
        "shipped:teacher_prose.jsonl",
    ]
    corpus_blocks, prose_blocks = result.report["plan"]["train_blocks_per_source"]
    assert corpus_blocks > 0 and prose_blocks > 0
    # the user's own config names no sources: resolved as the saved one was, nothing differs
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(tiny_run_config))
    resumed = resume_config(result.run_dir, plain)
    assert resumed.data.sources == load_config(result.run_dir / "config.yaml").data.sources


def test_a_saved_shipped_source_reads_the_installs_own_file(tmp_path, monkeypatch):
    """A run directory moved to another install reads that install's copy of the prose."""
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(with_default_prose(load_config()).model_dump(mode="json")))
    other_install = tmp_path / "site-packages" / "distill" / "data" / "files"
    other_install.mkdir(parents=True)
    (other_install / "teacher_prose.jsonl").write_bytes(shipped_prose().read_bytes())
    monkeypatch.setattr("distill.config.SHIPPED_DATA", other_install)
    prose = load_config(saved).data.sources[1]
    assert Path(prose.path) == other_install / "teacher_prose.jsonl"
    assert prose.model_dump()["path"] == "shipped:teacher_prose.jsonl"  # and saves as it read


def test_a_user_corpus_can_mix_in_the_shipped_prose():
    config = load_config(
        overrides=["data.sources=[{path: a.txt}, {path: 'shipped:teacher_prose.jsonl'}]"]
    )
    assert Path(config.data.sources[1].path) == shipped_prose()
    assert config.data.sources[0].model_dump()["path"] == "a.txt"  # other paths as given


@pytest.mark.parametrize("name", ["other_domain.txt", "nothing.jsonl"])
def test_only_trainable_shipped_files_are_sources(name):
    """The second held-out set ships beside the prose; naming it as training data is refused."""
    with pytest.raises(ConfigError) as refused:
        load_config(overrides=[f"data.sources=[{{}}, {{path: 'shipped:{name}'}}]"])
    message = str(refused.value)
    assert "\n" not in message
    assert "data.sources" in message and name in message
    assert "shipped:teacher_prose.jsonl" in message


def test_another_shipped_file_named_by_its_path_is_saved_as_given():
    """Only the prose is saved as shipped:NAME, so a saved config never names a refused one."""
    held_out = str(SHIPPED_DATA / "other_domain.txt")
    assert SourceConfig(path=held_out).model_dump()["path"] == held_out
