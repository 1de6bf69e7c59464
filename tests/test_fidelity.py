"""Fidelity: the second held-out set scored for every model, fidelity measured during training
(eval.every), the memorisation flag in the plan and the verdict."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llama

import distill
from distill.config import load_config
from distill.data import check_data_source
from distill.data.extra import OTHER_DOMAIN, extra_blocks, extra_sources, spread
from distill.errors import DataError
from distill.evaluate.fidelity import FidelityProbe, memorising
from distill.report.build import _verdict
from distill.teacher import LiveTeacher
from distill.train.checkpoint import rng_state

SET_KEYS = {"perplexity", "kl_to_teacher", "top1_agreement", "top5_agreement", "teacher_nll"}
MODELS = {"teacher", "student_before", "student_after", "student_labels_only"}


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, tiny_teacher_dir):
    root = tmp_path_factory.mktemp("fidelity")
    config = {
        "name": "probed",
        "output_dir": str(root / "runs"),
        "baseline": True,
        "teacher": {"path": str(tiny_teacher_dir)},
        "student": {"keep_first": 1, "keep_last": 1},
        "data": {"block_size": 32},
        "train": {"steps": 5, "batch_size": 2, "warmup_steps": 1, "threads": 1, "lr": 5e-3},
        "eval": {
            "max_blocks": 4,
            "batch_size": 2,
            "speed": False,
            "every": 2,
            "every_blocks": 2,
            "sample_prompts": 2,
            "sample_tokens": 4,
        },
    }
    return distill.distill(config)


def test_second_set_is_scored_for_every_model(probed_run):
    report = json.loads((probed_run.run_dir / "report.json").read_text())
    held = report["extra_sets"][OTHER_DOMAIN]
    assert held["source"].endswith("other_domain.txt") and held["blocks"] == 4
    assert set(held["models"]) == MODELS
    for name, metrics in held["models"].items():
        assert set(metrics) >= SET_KEYS, name
        assert all(metrics[key] is not None for key in SET_KEYS), name
    assert held["models"]["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert held["models"]["teacher"]["top1_agreement"] == 1.0
    for name in MODELS:  # the training domain's table gets the samples' teacher NLL too
        assert report["models"][name]["teacher_nll"] > 0
    markdown = (probed_run.run_dir / "report.md").read_text()
    assert f"Held-out set `{OTHER_DOMAIN}`" in markdown
    assert f"On {OTHER_DOMAIN} (another kind of text)" in report["verdict"]
    assert "Fidelity to the teacher" in report["verdict"]
    page = (probed_run.run_dir / "report.html").read_text()
    for name in MODELS:
        assert f'data-model="{name}" data-key="kl_to_teacher" data-set="{OTHER_DOMAIN}"' in page


def test_eval_every_writes_fidelity_records_at_its_steps(probed_run):
    for metrics in ("metrics.jsonl", "metrics_labels_only.jsonl"):
        records = [
            json.loads(line) for line in (probed_run.run_dir / metrics).read_text().splitlines()
        ]
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
        probed = [r["step"] for r in records if "fidelity" in r]
        assert probed == [2, 4, 5], metrics  # every 2 steps, and the last one
        for record in records:
            if "fidelity" in record:
                assert set(record["fidelity"]) == {"heldout", OTHER_DOMAIN}
                for scores in record["fidelity"].values():
                    assert scores["kl_to_teacher"] >= 0
                    assert 0 <= scores["top1_agreement"] <= 1
                assert record["eval_s"] >= 0
    page = (probed_run.run_dir / "report.html").read_text()
    assert "Not measured during training" not in page
    assert page.count("data:image/png;base64,") == 3  # losses, fidelity, size (no speed)


def test_probe_leaves_the_model_and_rng_unchanged(tiny_tokenizer):
    teacher = make_llama(len(tiny_tokenizer), layers=2)
    student = make_llama(len(tiny_tokenizer), layers=1, seed=1).train()
    blocks = torch.randint(0, len(tiny_tokenizer), (3, 16))
    probe = FidelityProbe(
        {"heldout": (blocks, None)},
        LiveTeacher(teacher),
        vocab_rows=len(tiny_tokenizer),
        batch_size=2,
    )
    weights = {k: v.clone() for k, v in student.state_dict().items()}
    before = rng_state()
    scores = probe(student)
    assert rng_state() == before
    assert student.training
    assert all(torch.equal(v, weights[k]) for k, v in student.state_dict().items())
    assert scores["heldout"]["kl_to_teacher"] > 0 and "seconds" in scores


def test_extra_data_sets_and_missing_ones(tmp_path, tiny_tokenizer, tiny_run_config):
    other = tmp_path / "letters.txt"
    other.write_text("Dear Sam,\n\nThe weather is fine and the garden is green.\n" * 20)
    sources = extra_sources([str(other), str(other)])
    assert list(sources) == ["letters", "letters_2"]
    assert list(extra_sources(None)) == [OTHER_DOMAIN] and extra_sources([]) == {}
    sets = extra_blocks(None, tiny_tokenizer, 32, 5)
    assert sets[OTHER_DOMAIN].shape == (5, 32)
    rows = torch.arange(10)[:, None]
    assert spread(rows, 3).flatten().tolist() == [0, 4, 9]  # first to last, evenly
    missing = load_config(
        base={**tiny_run_config, "eval": {"extra_data": [str(tmp_path / "nope.txt")]}}
    )
    with pytest.raises(DataError, match="eval.extra_data"):
        check_data_source(missing)


def _tiny_corpus(path):
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "the",
        "dog",
        "ran",
        "to",
        "the",
        "red",
        "barn",
    ]
    paragraphs = [" ".join(words[(i + j) % len(words)] for j in range(24)) + "." for i in range(10)]
    path.write_text("\n\n".join(paragraphs))
    return path


def test_memorisation_flag_fires_after_many_epochs_not_on_a_fresh_student(
    tmp_path, tiny_run_config
):
    corpus = _tiny_corpus(tmp_path / "tiny.txt")
    base = {
        **tiny_run_config,
        "data": {"block_size": 32, "path": str(corpus), "heldout_fraction": 0.2},
        "eval": {**tiny_run_config["eval"], "speed": False, "every": 0, "sample_prompts": 0},
    }
    fresh = distill.distill(
        {**base, "name": "fresh", "train": {**base["train"], "steps": 1, "lr": 1e-6}}
    ).report
    assert "memorisation_warning" not in fresh["plan"]
    kept = fresh["plan"]["student_layers"]  # the searched teacher layers, recorded for a rerun
    assert len(kept) == 2 and kept == sorted(set(kept)) and kept[0] >= 0
    assert "fitting the training data" not in fresh["verdict"]
    assert not memorising(fresh["models"]["student_after"], fresh["models"]["teacher"])
    # Labels are what a student memorises: pure distillation (the default) only follows the
    # teacher, so this run gives the labels half the loss.
    trained = distill.distill(
        {
            **base,
            "name": "many",
            "loss": {"alpha": 0.5},
            "train": {**base["train"], "steps": 40, "lr": 1e-2},
        }
    ).report
    assert trained["plan"]["epochs"] > 4
    assert "passes over its" in trained["plan"]["memorisation_warning"]
    assert "fitting the training data" in trained["verdict"]
    markdown = (tmp_path / "runs" / "many" / "report.md").read_text()
    assert "Plan: this run passes over" in markdown


def test_verdict_speaks_of_fidelity_and_flags_low_perplexity():
    teacher = {"perplexity": 18.3, "kl_to_teacher": 0.0, "top1_agreement": 1.0}
    before = {"perplexity": 313.0, "kl_to_teacher": 3.0, "top1_agreement": 0.2}
    after = {"perplexity": 5.9, "kl_to_teacher": 1.18, "top1_agreement": 0.447}
    models = {"teacher": teacher, "student_before": before, "student_after": after}
    text = _verdict(models)
    assert "KL to the teacher 3.000 -> 1.180" in text and "top-1 agreement 0.200 -> 0.447" in text
    assert "fitting the training data rather than the teacher" in text
    models["student_after"] = {**after, "perplexity": 20.0}
    assert "fitting the training data" not in _verdict(models)
