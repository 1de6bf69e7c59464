"""distill_module: the generic nn.Module API, its loop contract, report, and the digits example."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from references import reference_objective
from safetensors.torch import load_model
from torch import nn

from distill import distill_module
from distill.config import CheckpointConfig, LossConfig, TrainConfig
from distill.errors import ConfigError, DistillError
from distill.evaluate.classifier import default_labels, evaluate_classifier
from distill.train.loader import LoaderPosition

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
    assert result.history.history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert result.history.history[0]["items"] == sum(int((y != -100).sum()) for _, y in batches)


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
    assert records[-1]["divergence"] < records[0]["divergence"]
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


def test_a_window_without_labelled_items_is_refused():
    """The loop's one rule for every task: a window whose count is 0 raises."""
    unlabelled = [(x, torch.full_like(y, -100)) for x, y in _batches(2, 4)]
    with pytest.raises(DistillError, match="no targets"):
        distill_module(
            None,
            nn.Linear(4, 5),
            unlabelled,
            _logits,
            loss=LossConfig(alpha=1.0),
            train=TrainConfig(steps=1, batch_size=4, warmup_steps=0),
        )


def test_torchrun_is_refused_before_any_work(tmp_path, monkeypatch):
    """Module runs train in one process: under torchrun (WORLD_SIZE > 1) one clear error."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="without torchrun"):
        distill_module(None, nn.Linear(4, 5), _batches(1, 2), _logits, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_digits_example_reduced():
    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    results = digits.main(teacher_steps=150, student_steps=60, batch_size=64)
    assert results["teacher_accuracy"] > 0.85
    assert results["student_params"] < results["teacher_params"] / 10
    for key in ("student_kd_accuracy", "student_labels_only_accuracy"):
        assert 0.3 < results[key] <= 1.0 and not math.isnan(results[key])


def test_digits_validation_part_is_cut_from_the_training_split_only():
    """Settings chosen on the validation part never see the test part they are reported on."""
    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    train, test = digits.digits_data(3)
    fit, validation = digits.digits_data(3, validation=True)

    def rows(dataset) -> set[bytes]:
        return {row.numpy().tobytes() for row in dataset.tensors[0]}

    assert rows(fit) | rows(validation) == rows(train)
    assert not rows(fit) & rows(validation)
    assert not (rows(fit) | rows(validation)) & rows(test)
    assert len(validation) == pytest.approx(len(train) / 4, abs=2)


# ---------------------------------------------------------------- checkpoint / resume


class _Crash(RuntimeError):
    pass


class _Noisy(nn.Module):
    """Dropout (process RNG) between two layers: a resume must restore the RNG exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Jittered(torch.utils.data.Dataset):
    """Random augmentation from the process RNG in __getitem__ (main-process loading)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.x = torch.randn(20, 4, generator=generator)
        self.y = torch.randint(0, 5, (20,), generator=generator)

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


def _resume_setup(crash_at: int | None):
    """Teacher, fresh student, shuffling loader (own generator) of 5 batches/epoch, logits fn
    that raises on its ``crash_at``-th student call."""
    torch.manual_seed(0)
    teacher, student = _Noisy().eval(), _Noisy()
    loader = torch.utils.data.DataLoader(
        _Jittered(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    calls = {"student": 0}

    def logits(model: nn.Module, batch) -> torch.Tensor:
        if model is student:
            calls["student"] += 1
            if crash_at is not None and calls["student"] == crash_at:
                raise _Crash
        return model(batch[0])

    return teacher, student, loader, logits


def test_crash_then_resume_is_bit_identical(tmp_path):
    config = {
        "loss": LossConfig(alpha=0.3, temperature=2.0, alpha_schedule="linear", alpha_end=0.6),
        "train": TrainConfig(steps=13, grad_accum=2, lr=1e-2, warmup_steps=2),
        "checkpoint": CheckpointConfig(every=3, keep=2),
    }
    teacher, straight, loader, logits = _resume_setup(None)
    distill_module(teacher, straight, loader, logits, run_dir=tmp_path / "straight", **config)

    run = tmp_path / "resumed"
    # Crash during step 8 (its 16th micro-batch): the newest checkpoint is step 6, mid-epoch 3.
    teacher, student, loader, logits = _resume_setup(16)
    with pytest.raises(_Crash):
        distill_module(teacher, student, loader, logits, run_dir=run, **config)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000006",
    ]
    assert _logged_steps(run) == list(range(1, 8))  # step 7 logged, not checkpointed
    with pytest.raises(ValueError, match="resume=True"):
        distill_module(*_resume_setup(None)[:2], loader, logits, run_dir=run, **config)

    torch.manual_seed(123)  # the process RNG is restored from the checkpoint, not reused
    teacher, student, loader, logits = _resume_setup(None)
    result = distill_module(teacher, student, loader, logits, run_dir=run, resume=True, **config)
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, result.student.state_dict()[name]), name
    assert _logged_steps(run) == list(range(1, 14))
    straight_records = _records(tmp_path / "straight")
    for a, b in zip(straight_records, _records(run), strict=True):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000012",
        "step-00000013",
    ]


def test_resume_without_checkpoint_starts_afresh(tmp_path):
    teacher, student, loader, logits = _resume_setup(2)
    config = {"train": TrainConfig(steps=4), "checkpoint": CheckpointConfig(every=3)}
    with pytest.raises(_Crash):
        distill_module(teacher, student, loader, logits, run_dir=tmp_path, **config)
    teacher, student, loader, logits = _resume_setup(None)
    distill_module(teacher, student, loader, logits, run_dir=tmp_path, resume=True, **config)
    assert _logged_steps(tmp_path) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="run_dir"):
        distill_module(teacher, student, loader, logits, resume=True)


def test_loader_position_restores_a_plain_iterable():
    batches = list(range(5))
    position = LoaderPosition(batches)
    drawn = [position.next() for _ in range(7)]
    state = position.state_dict()
    assert drawn == [0, 1, 2, 3, 4, 0, 1] and state["epoch"] == 1 and state["drawn"] == 2
    again = LoaderPosition(batches)
    again.restore(state)
    assert [again.next() for _ in range(4)] == [2, 3, 4, 0]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _logged_steps(run: Path) -> list[int]:
    return [record["step"] for record in _records(run)]


# ---------------------------------------------------------------- loss knobs


@pytest.mark.parametrize(
    ("divergence", "scale_by_t2"), [("reverse_kl", True), ("jsd", False), ("tv", True)]
)
def test_divergence_knobs_match_float64_reference(divergence, scale_by_t2):
    teacher, student = nn.Linear(4, 5), nn.Linear(4, 5)
    batches = _batches(2, 4)
    loss = LossConfig(
        alpha=0.3, temperature=3.0, divergence=divergence, beta=0.3, scale_by_t2=scale_by_t2
    )
    train = TrainConfig(steps=1, grad_accum=2, warmup_steps=0)
    with torch.no_grad():
        s = torch.cat([_logits(student, b).reshape(-1, 5) for b in batches]).double()
        t = torch.cat([_logits(teacher, b).reshape(-1, 5) for b in batches]).double()
    labels = torch.cat([y.reshape(-1) for _, y in batches])
    expected = reference_objective(
        s,
        t,
        labels,
        temperature=3.0,
        alpha=0.3,
        divergence=divergence,
        beta=0.3,
        scale_by_t2=scale_by_t2,
    )
    forward = reference_objective(s, t, labels, temperature=3.0, alpha=0.3)
    assert abs(float(expected) - float(forward)) > 1e-3  # the knob changes the objective
    result = distill_module(
        teacher, copy.deepcopy(student), batches, _logits, loss=loss, train=train
    )
    assert result.history.history[0]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_alpha_and_temperature_schedules_reach_the_loss():
    """Step k of 3 uses alpha / T from the linear schedules (lr 1e-12: the student stays put)."""
    teacher, student = nn.Linear(4, 5), nn.Linear(4, 5)
    batches = _batches(3, 4)
    loss = LossConfig(
        alpha=0.2,
        alpha_schedule="linear",
        alpha_end=0.8,
        temperature=1.0,
        temperature_schedule="linear",
        temperature_end=3.0,
    )
    train = TrainConfig(steps=3, lr=1e-12, warmup_steps=0)
    result = distill_module(
        teacher, copy.deepcopy(student), batches, _logits, loss=loss, train=train
    )
    for step, (alpha, temperature) in enumerate([(0.2, 1.0), (0.5, 2.0), (0.8, 3.0)]):
        expected = _reference_loss(
            copy.deepcopy(student), teacher, [batches[step]], alpha, temperature
        )
        assert result.history.history[step]["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        distill_module(
            None,
            student,
            batches,
            _logits,
            loss=LossConfig(alpha=1.0, alpha_schedule="linear", alpha_end=0.5),
        )
