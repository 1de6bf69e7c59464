"""End to end on tiny models: every output file, a reloadable student, the report's keys."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import distill
from distill.cli import main as cli_main

REPORT_KEYS = {
    "params",
    "bytes",
    "perplexity",
    "kl_to_teacher",
    "top1_agreement",
    "tokens_per_s",
    "peak_rss_bytes",
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("e2e")
    config = {
        "name": "tiny",
        "output_dir": str(root / "runs"),
        "baseline": True,
        "teacher": {"path": str(tiny_teacher_dir)},
        "student": {"keep_first": 1, "keep_last": 1},
        "data": {"block_size": 32},
        "train": {
            "steps": 3,
            "batch_size": 2,
            "warmup_steps": 1,
            "threads": 1,
            "device": "cpu",
            "lr": 5e-3,
        },
        "eval": {"max_blocks": 4, "batch_size": 2, "gen_new_tokens": 4, "gen_prompts": ["def f"]},
    }
    return distill.distill(config)


def test_run_writes_every_file(finished_run):
    run_dir = finished_run.run_dir
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics_labels_only.jsonl",
        "report.json",
        "report.md",
        "loss.png",
        "student/model.safetensors",
        "student/config.json",
        "student/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 3
    assert not (run_dir / ".eval_models").exists()


def test_report_has_every_model_and_key(finished_run):
    report = json.loads((finished_run.run_dir / "report.json").read_text())
    assert set(report["models"]) == {
        "teacher",
        "student_before",
        "student_after",
        "student_labels_only",
    }
    for name, metrics in report["models"].items():
        assert set(metrics) >= REPORT_KEYS, name
        assert all(metrics[key] is not None for key in REPORT_KEYS), name
    assert report["models"]["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert report["models"]["teacher"]["top1_agreement"] == 1.0
    assert report["plan"]["device"] == "cpu"  # the run config names train.device=cpu
    student_file = finished_run.run_dir / "student" / "model.safetensors"
    assert report["models"]["student_after"]["bytes"] == student_file.stat().st_size
    assert report["models"]["student_after"]["params"] < report["models"]["teacher"]["params"]
    assert "student_after" in (finished_run.run_dir / "report.md").read_text()


def test_saved_student_reloads_with_plain_transformers(finished_run, tiny_tokenizer):
    """The saved student loads without distill and gives logits identical to the trained model."""
    reloaded = AutoModelForCausalLM.from_pretrained(finished_run.run_dir / "student").eval()
    assert reloaded.config.num_hidden_layers == 2
    assert "quantization_config" not in reloaded.config.to_dict()
    input_ids = torch.tensor([tiny_tokenizer("def f(x): return x")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, finished_run.student(input_ids).logits)


def test_speed_can_be_turned_off(tiny_run_config, finished_run):
    """No speed numbers, and the quality numbers untouched: the untrained student (same teacher,
    same layers kept, same held-out blocks) scores what it scored in the run with speed on."""
    config = {**tiny_run_config, "eval": {**tiny_run_config["eval"], "speed": False}}
    report = distill.distill(config).report
    assert report["models"]["student_after"]["tokens_per_s"] is None
    before = finished_run.report["models"]["student_before"]
    for key in ("perplexity", "kl_to_teacher"):
        assert report["models"]["student_before"][key] == pytest.approx(before[key], rel=1e-6)


def test_report_command_rebuilds(finished_run, capsys):
    """The CLI rebuilds report.md from the run's files: the same text the run wrote."""
    written = (finished_run.run_dir / "report.md").read_text()
    (finished_run.run_dir / "report.md").unlink()
    cli_main(["report", str(finished_run.run_dir)])
    assert (finished_run.run_dir / "report.md").read_text() == written
