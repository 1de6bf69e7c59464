"""Bad input through the real CLI (a subprocess): one line naming the problem, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_llama, make_tokenizer, save_model


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distill", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("distill: error")]
    assert len(error_lines) == 1, result.stderr
    for needle in needles:
        assert needle in error_lines[0], (needle, error_lines[0])


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["train.stepz=3"], ["unknown key", "train.stepz"]),
        (["train.steps=abc"], ["train.steps", "'abc'"]),
        (["loss.alpha=1.5"], ["loss.alpha", "1.5"]),
        (["loss.temperature=0"], ["loss.temperature"]),
        (["student.layers=[0,1]", "student.every_k=2"], ["student.layers", "student.every_k"]),
        (["trainsteps"], ["key=value"]),
    ],
)
def test_bad_config_values(overrides, needles):
    args = ["config"]
    for item in overrides:
        args += ["--set", item]
    assert_one_line_error(run_cli(*args), *needles)


def test_missing_config_file(tmp_path):
    assert_one_line_error(run_cli("run", "--config", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_unknown_key_in_yaml(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("loss:\n  temprature: 3\n")
    assert_one_line_error(run_cli("config", "--config", str(config)), "loss.temprature", "bad.yaml")


def test_missing_teacher_and_data(tmp_path, tiny_teacher_dir):
    result = run_cli(
        "run", "--set", f"teacher.path={tmp_path / 'no_teacher'}", "--set", f"output_dir={tmp_path}"
    )
    assert_one_line_error(result, "no_teacher", "does not exist")
    result = run_cli(
        "run",
        "--set",
        f"teacher.path={tiny_teacher_dir}",
        "--set",
        f"data.path={tmp_path / 'missing.jsonl'}",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        "student.keep_last=1",
        "--set",
        "student.keep_first=1",
    )
    assert_one_line_error(result, "missing.jsonl", "does not exist")


def test_jsonl_without_text_field(tmp_path, tiny_teacher_dir):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"body": "hello"}\n')
    result = run_cli(
        "run",
        "--set",
        f"teacher.path={tiny_teacher_dir}",
        "--set",
        f"data.path={data}",
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        "student.keep_first=1",
        "--set",
        "student.keep_last=1",
    )
    assert_one_line_error(result, "rows.jsonl:1", "'text'")


def test_tokenizer_mismatch_stops_before_work(tmp_path, tiny_teacher_dir):
    other_tokenizer = make_tokenizer(vocab_size=300)
    student_dir = save_model(make_llama(len(other_tokenizer)), other_tokenizer, tmp_path / "s")
    result = run_cli(
        "run",
        "--set",
        f"teacher.path={tiny_teacher_dir}",
        "--set",
        f"student.path={student_dir}",
        "--set",
        f"output_dir={tmp_path}",
    )
    assert_one_line_error(result, "tokenizers differ", "384", "300")
    assert not (tmp_path / "default" / "metrics.jsonl").exists()


def test_config_show_lists_every_section():
    result = run_cli("config", "--show")
    assert result.returncode == 0
    for key in ("teacher:", "student:", "temperature: 1.0", "alpha: 0.0", "# Softmax temperature"):
        assert key in result.stdout
