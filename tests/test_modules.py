"""distill.modules: the generic nn.Module API, its loop contract, report, and the digits example."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model
from torch import nn

from distill.config import LossConfig, TrainConfig
from distill.modules import default_labels, distill_module, evaluate_classifier

ROOT = Path(__file__).resolve().parents[1]


def _batches(n_batches: int, batch: int, seq: int = 3, classes: int = 5, seed: int = 0):
    """Fixed (inputs [B, seq, 4], labels [B, seq]) batches with some ignored labels."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, seq, 4, generator=generator)
        y = torch.randint(0, classes, (batch, seq), generator=generator)
        y[torch.rand(batch, seq, generator=generator) < 0.25] = -100
        out.append((x, y))
    return out


def _logits(model: nn.Module, batch) -> torch.Tensor:
    return model(batch[0])  # (B, seq, C)


@torch.no_grad()
def _reference_loss(student, teacher, batches, alpha: float, temperature: float) -> float:
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher || student), float64, mean over labelled items."""
    total, count = 0.0, 0
    for x, y in batches:
        s = student.double()(x.double()).reshape(-1, 5)
        t = teacher.double()(x.double()).reshape(-1, 5)
        for row_s, row_t, label in zip(s, t, y.reshape(-1), strict=True):
            if label == -100:
                continue
            log_p = row_s - torch.logsumexp(row_s, 0)
            ls, lt = row_s / temperature, row_t / temperature
            log_ps, log_pt = ls - torch.logsumexp(ls, 0), lt - torch.logsumexp(lt, 0)
            kl = float((log_pt.exp() * (log_pt - log_ps)).sum())
            total += alpha * float(-log_p[label]) + (1 - alpha) * temperature**2 * kl
            count += 1
    student.float(), teacher.float()
    return total / count


def test_first_logged_loss_matches_float64_reference():
    teacher, student = nn.Linear(4, 5), nn.Linear(4, 5)
    batches = _batches(3, 4)
    expected = _reference_loss(copy.deepcopy(student), teacher, batches, 0.3, 2.0)
    result = distill_module(
        teacher,
        student,
        batches,
        _logits,
        loss=LossConfig(alpha=0.3, temperature=2.0),
        train=TrainConfig(steps=1, grad_accum=3, warmup_steps=0),
    )
    assert result.history.records[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert result.history.records[0]["items"] == sum(int((y != -100).sum()) for _, y in batches)


def test_batch_8x1_equals_batch_2x4():
    """One optimizer step over the same 8 examples: one micro-batch or four give the same update."""
    teacher, start = nn.Linear(4, 5), nn.Linear(4, 5)
    (big,) = _batches(1, 8)
    small = [(big[0][i : i + 2], big[1][i : i + 2]) for i in range(0, 8, 2)]
    one, four = copy.deepcopy(start), copy.deepcopy(start)
    config = {"steps": 1, "warmup_steps": 0, "lr": 1e-2, "grad_clip": 0.5}
    distill_module(teacher, one, [big], _logits, train=TrainConfig(**config))
    distill_module(teacher, four, small, _logits, train=TrainConfig(grad_accum=4, **config))
    assert not torch.allclose(one.weight, start.weight)
    torch.testing.assert_close(one.weight, four.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(one.bias, four.bias, atol=1e-6, rtol=0)


def test_run_dir_report_and_checkpoint(tmp_path):
    teacher, student = nn.Linear(4, 5), nn.Linear(4, 5)
    batches = _batches(4, 8)
    result = distill_module(
        teacher,
        student,
        batches,
        _logits,
        loss=LossConfig(alpha=0.0),
        train=TrainConfig(steps=30, lr=5e-2, warmup_steps=0),
        eval_loader=batches,
        run_dir=tmp_path / "run",
    )
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["kl"] < records[0]["kl"]
    report = json.loads((run / "report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "student_before", "student_after"}
    assert models["student_after"]["kl_to_teacher"] < models["student_before"]["kl_to_teacher"]
    assert report["retention"]["accuracy"] == pytest.approx(
        models["student_after"]["accuracy"] / models["teacher"]["accuracy"]
    )
    assert "| student_after |" in (run / "report.md").read_text()
    reloaded = nn.Linear(4, 5)
    load_model(reloaded, str(run / "student" / "model.safetensors"))
    torch.testing.assert_close(reloaded.weight, result.student.weight)
    with pytest.raises(ValueError, match="run_dir"):
        distill_module(teacher, student, batches, _logits, run_dir=run)


def test_evaluate_classifier_counts_only_labelled_items():
    model = nn.Linear(4, 5)
    batches = _batches(2, 4)
    metrics = evaluate_classifier(model, batches, _logits, teacher=model)
    logits = torch.cat([_logits(model, b).reshape(-1, 5) for b in batches])
    labels = torch.cat([b[1].reshape(-1) for b in batches])
    keep = labels != -100
    expected = float((logits[keep].argmax(-1) == labels[keep]).double().mean())
    assert metrics["accuracy"] == pytest.approx(expected)
    assert metrics["top1_agreement"] == 1.0
    assert metrics["kl_to_teacher"] == pytest.approx(0.0, abs=1e-7)


def test_user_mistakes_name_the_argument():
    student = nn.Linear(4, 5)
    with pytest.raises(ValueError, match="teacher"):
        distill_module(None, student, _batches(1, 2), _logits)
    with pytest.raises(ValueError, match="labels_fn"):
        default_labels(torch.zeros(3))
    with pytest.raises(ValueError, match="loader"):
        distill_module(None, student, [], _logits, loss=LossConfig(alpha=1.0))


def test_digits_example_reduced():
    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    results = digits.main(teacher_steps=150, student_steps=60, batch_size=64)
    assert results["teacher_accuracy"] > 0.85
    assert results["student_params"] < results["teacher_params"] / 10
    for key in ("student_kd_accuracy", "student_labels_only_accuracy"):
        assert 0.3 < results[key] <= 1.0 and not math.isnan(results[key])
