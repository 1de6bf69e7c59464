"""Rules a config alone decides fail when it loads, before any model loads; data files are
checked (existence, kind, UTF-8, format against teacher.cache) before any model loads too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import distill.models
import distill.pipelines.encoder_run as encoder_run
import distill.pipelines.run
import distill.pipelines.run_models
from distill.cli import main
from distill.config import load_config, renormalized_top_k_without_labels
from distill.data import check_data_source, read_documents
from distill.data.examples import detect_format, read_rows
from distill.data.prompts import read_prompts
from distill.encoders.data import read_labelled
from distill.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every model loader raises: a rule checked late would fail this way, not with its message."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was refused")

    for module, name in (
        (distill.models, "load_causal_lm"),
        (distill.models, "load_tokenizer"),
        (distill.pipelines.run_models, "load_causal_lm"),
        (distill.pipelines.run_models, "load_tokenizer"),
        (encoder_run, "load_encoder"),
    ):
        monkeypatch.setattr(module, name, refuse)


ENCODER = ["teacher.path=t", "data.path=rows.csv"]
RULES = [
    (
        ["onpolicy.lambda=0.5", "teacher.cache=c"],
        ["onpolicy.lambda", "teacher.cache", "unset teacher.cache"],
    ),
    (["intermediate.hidden_weight=1", "teacher.cache=c"], ["intermediate", "teacher.cache"]),
    (["intermediate.attention_weight=0.5", "teacher.cache=c"], ["intermediate", "teacher.cache"]),
    (["data.format=chat", "data.path=x.jsonl", "teacher.cache=c"], ["data.format=chat", "cache"]),
    (["data.format=prompt_response", "teacher.cache=c"], ["data.format=prompt_response"]),
    (["data.format=chat"], ["data.format=chat", "needs data.path"]),
    (["data.format=prompt_response", "data.path=x.txt"], ["data.format", ".jsonl", "x.txt"]),
    (
        ["student.layers=[0,2]", "intermediate.hidden_weight=1", "intermediate.layer_map=[1]"],
        ["intermediate.layer_map", "1 entries", "2 student layers"],
    ),
    (["student.layers=[1,1]"], ["student.layers", "repeated"]),
    (["compress.heal_steps=5"], ["compress.heal_steps", "compress.prune"]),
    (["task=classification"], ["task classification", "teacher.path"]),
    (["task=classification", "teacher.path=t"], ["task classification", "data.path"]),
    (["task=classification", *ENCODER, "encoder.augment=3"], ["encoder.augment", "embedding"]),
    (["task=embedding", "baseline=true"], ["baseline", "task embedding"]),
    (
        ["task=embedding", "student.path=s", "encoder.hidden_weight=1"],
        ["encoder.hidden_weight", "unset student.path"],
    ),
    (
        ["task=classification", *ENCODER, "student.path=s", "encoder.attention_weight=1"],
        ["attention_weight", "student.path"],
    ),
]


@pytest.mark.parametrize(("overrides", "needles"), RULES)
def test_rule_fails_when_the_config_loads(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--set: "), message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["teacher.cache=c"],  # plain text from a cache
        ["onpolicy.lambda=0.5", "data.format=chat", "data.path=x.jsonl"],  # live teacher
        ["intermediate.hidden_weight=1", "student.layers=[0,2]", "intermediate.layer_map=[1,3]"],
        ["intermediate.hidden_weight=1", "intermediate.layer_map=[1]", "student.every_k=2"],
        ["task=embedding", "teacher.cache=c", "data.format=chat"],  # encoders ignore both
        ["task=classification", *ENCODER, "baseline=true", "encoder.hidden_weight=1"],
        ["compress.prune=0.3", "compress.heal_steps=5"],
        ["compress.quantize=int8"],
    ],
)
def test_valid_combinations_still_load(overrides):
    load_config(overrides=overrides)


def test_rules_apply_to_yaml_and_dict_configs(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  cache: c\nonpolicy:\n  lambda: 0.5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: onpolicy\.lambda > 0"):
        load_config(config)
    with pytest.raises(ConfigError, match="baseline: needs labels"):
        distill.pipelines.run.distill(
            {"task": "embedding", "baseline": True, "output_dir": str(tmp_path)}
        )
    assert not (tmp_path / "default").exists()  # refused before the run directory is made


def test_cli_run_refuses_with_one_line_and_exit_2(tmp_path, capsys):
    args = ["run", "--set", "onpolicy.lambda=0.5", "--set", f"teacher.cache={tmp_path / 'c'}"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--set", f"output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith("distill: error: --set: onpolicy.lambda > 0")


def test_cli_subprocess_refuses_a_cross_section_rule(tmp_path):
    source = str(
        Path(distill.pipelines.run.__file__).parents[2]
    )  # this checkout's code, not an install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "distill", "run", "--set", "task=embedding", "--baseline"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("distill: error")]
    assert "baseline" in line and "task embedding" in line


# --- non-UTF-8 data: a one-line DataError naming the file and the first bad byte's offset ---

BAD = b"\xff"


def _bad_file(path, head: bytes, tail: bytes = b" more\n") -> int:
    path.write_bytes(head + BAD + tail)
    return len(head)


def _assert_names(err: pytest.ExceptionInfo, path, offset: int) -> None:
    message = str(err.value)
    assert str(path) in message and f"byte offset {offset}" in message, message
    assert "\n" not in message


def test_non_utf8_txt_names_file_and_offset(tmp_path):
    path = tmp_path / "corpus.txt"
    offset = _bad_file(path, "first paragraph é\n\nsecond ".encode())
    with pytest.raises(DataError) as err:
        read_documents(path)
    _assert_names(err, path, offset)


def test_non_utf8_jsonl_names_file_and_offset(tmp_path):
    path = tmp_path / "rows.jsonl"
    head = '{"text": "ünïcode fine"}\n\n{"text": "'.encode()
    offset = _bad_file(path, head, b'"}\n')
    for reader in (read_documents, read_rows):
        with pytest.raises(DataError) as err:
            reader(path)
        _assert_names(err, path, offset)
    first_line_bad = tmp_path / "first.jsonl"
    offset = _bad_file(first_line_bad, b'{"messages": "', b'"}\n')
    with pytest.raises(DataError) as err:
        detect_format(first_line_bad, "auto")
    _assert_names(err, first_line_bad, offset)


def test_non_utf8_labelled_and_prompt_files(tmp_path):
    csv_path = tmp_path / "rows.csv"
    offset = _bad_file(csv_path, b"text,label\r\nhello,a\r\nbad ", b",b\r\n")
    with pytest.raises(DataError) as err:
        read_labelled(csv_path)
    _assert_names(err, csv_path, offset)
    prompts = tmp_path / "prompts.txt"
    offset = _bad_file(prompts, b"one prompt\ntwo ")
    with pytest.raises(DataError) as err:
        read_prompts(prompts)
    _assert_names(err, prompts, offset)


def test_utf8_csv_with_crlf_and_quoted_newline_still_reads(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes('text,label\r\n"two\r\nlines",a\r\ncafé,b\r\n'.encode())
    assert read_labelled(path) == [("two\r\nlines", "a"), ("café", "b")]


# --- check_data_source: the file-dependent checks, before any model loads ---


def test_check_data_source_refuses_a_missing_path(tmp_path):
    config = load_config(overrides=[f"data.path={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(DataError, match=r"missing\.jsonl does not exist"):
        check_data_source(config)
    check_data_source(load_config())  # the default corpus


def test_check_data_source_refuses_non_utf8_and_wrong_kinds(tmp_path):
    path = tmp_path / "corpus.txt"
    offset = _bad_file(path, b"fine text\n")
    with pytest.raises(DataError) as err:
        check_data_source(load_config(overrides=[f"data.path={path}", "task=embedding"]))
    _assert_names(err, path, offset)
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "notes.md").write_text("not data")
    with pytest.raises(DataError, match="holds no"):
        check_data_source(load_config(overrides=[f"data.path={directory}"]))
    (directory / "part.txt").write_bytes(b"ok\n" + BAD)
    with pytest.raises(DataError, match=r"part\.txt.*byte offset 3"):
        check_data_source(load_config(overrides=[f"data.path={directory}"]))
    classification = ["task=classification", "teacher.path=t", f"data.path={tmp_path / 'x.txt'}"]
    (tmp_path / "x.txt").write_text("text\n")
    with pytest.raises(DataError, match=r"x\.txt: expected \.csv or \.jsonl"):
        check_data_source(load_config(overrides=classification))


def test_check_data_source_refuses_detected_chat_with_a_cache(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    live = load_config(overrides=[f"data.path={chat}"])
    check_data_source(live)  # data.format=auto finds chat rows: fine with a live teacher
    cached = load_config(overrides=[f"data.path={chat}", f"teacher.cache={tmp_path / 'c'}"])
    with pytest.raises(ConfigError, match=r"chat\.jsonl holds chat rows.*unset teacher\.cache"):
        check_data_source(cached)
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "plain"}\n')
    check_data_source(load_config(overrides=[f"data.path={text}", "teacher.cache=c"]))


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        (["teacher.cache=c", "loss.sparse=renormalized"], True),  # the default alpha is 0
        (["teacher.url=http://127.0.0.1:8000", "loss.sparse=renormalized"], True),
        (["teacher.cache=c", "loss.sparse=renormalized", "loss.alpha=0.2"], False),
        (["teacher.cache=c"], False),  # the tail bucket pushes the rest down
        (["loss.sparse=renormalized"], False),  # the live teacher's full logits
        (
            [
                "teacher.cache=c",
                "loss.sparse=renormalized",
                "loss.alpha_schedule=linear",
                "loss.alpha_end=0.5",
            ],
            False,
        ),
    ],
)
def test_plan_warns_of_a_renormalised_top_k_loss_without_labels(overrides, warned):
    advice = renormalized_top_k_without_labels(load_config(overrides=overrides))
    assert (advice is not None) == warned
    if warned:
        assert "loss.sparse=renormalized" in advice and "loss.alpha" in advice
