"""Distil any PyTorch classifier: a teacher ``nn.Module`` into a student ``nn.Module``.

The same objective (:func:`distill.losses.distillation_loss`), optimizer and schedule
(:func:`distill.train.build_optimizer`) as the LLM path, in a loop that only needs a data loader
and a function mapping ``(model, batch)`` to logits::

    from distill import distill_module
    result = distill_module(teacher, student, loader, lambda model, batch: model(batch[0]),
                            train=TrainConfig(steps=300), eval_loader=test_loader, run_dir="runs/x")

Training is :func:`distill.train.train` (the loop of every task; its module docstring maps one
step) given a :class:`~distill.train.task.ModuleTask`: the items with a label count, the loss is
this module's ``terms``. One process only (torchrun is refused before any work). The run folder
gets ``metrics.jsonl``,
``checkpoints/step-N/``, ``student/model.safetensors``, ``evaluation.json`` and
``report.json``/``report.md``; ``resume=True`` continues it exactly from the newest valid
checkpoint (the loader is re-iterated and the batches already drawn this epoch skipped).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from distill.config import CheckpointConfig, LossConfig, TrainConfig
from distill.evaluate.classifier import (
    LabelsFn,
    LogitsFn,
    default_labels,
    evaluate_classifier,
    flat_logits,
)
from distill.io import atomic_directory, atomic_write_json
from distill.losses import IGNORE_INDEX
from distill.losses.objective import logits_distillation_loss
from distill.losses.schedule import LossSettings
from distill.models import count_params
from distill.report import build_report
from distill.train import loop
from distill.train.loop import CheckpointPlan, TrainState
from distill.train.task import ModuleTask, refuse_torchrun

__all__ = ["ModuleResult", "distill_module"]


@dataclass
class ModuleResult:
    student: nn.Module  # trained in place
    history: TrainState  # the step reached and the logged records
    evaluation: dict[str, dict[str, float]] | None  # teacher / student_before / student_after
    run_dir: Path | None


def distill_module(
    teacher: nn.Module | None,
    student: nn.Module,
    loader: Iterable,
    logits_fn: LogitsFn,
    *,
    labels_fn: LabelsFn = default_labels,
    loss: LossConfig | None = None,
    train: TrainConfig | None = None,
    eval_loader: Iterable | None = None,
    run_dir: str | Path | None = None,
    checkpoint: CheckpointConfig | None = None,
    resume: bool = False,
) -> ModuleResult:
    """Train ``student`` in place on ``alpha * CE + (1 - alpha) * T^2 * D(teacher, student)``.

    Every :class:`~distill.config.LossConfig` knob applies: ``divergence`` (forward KL by
    default; beta, skew), ``scale_by_t2``, and the temperature / alpha schedules over the steps.
    ``logits_fn(model, batch)`` returns logits ``[..., C]`` whose leading shape matches
    ``labels_fn(batch)`` (labels equal to -100 are ignored). ``teacher=None`` (or alpha 1
    throughout) trains on labels alone. With ``eval_loader``, teacher, student before and
    student after are evaluated; with ``run_dir``, metrics.jsonl, student/model.safetensors,
    evaluation.json and report.json/report.md are written there, and checkpoints go to
    ``run_dir/checkpoints`` per ``checkpoint`` (default: every 20 steps and at the end, newest 2
    kept). ``resume=True`` continues a run in ``run_dir`` from its newest valid checkpoint: pass
    the same (freshly built) student, loader and configs; see :class:`LoaderPosition` for how the
    data position is restored.
    """
    refuse_torchrun("distill_module")
    loss = loss or LossConfig()
    train = train or TrainConfig()
    checkpoint = checkpoint or CheckpointConfig()
    alphas = (loss.alpha, loss.alpha if loss.alpha_schedule == "constant" else loss.alpha_end)
    needs_teacher = min(alphas) < 1.0
    if teacher is None and needs_teacher:
        raise ValueError("teacher: None needs loss.alpha == 1 throughout (labels only)")
    run_path = Path(run_dir) if run_dir is not None else None
    if resume and run_path is None:
        raise ValueError("resume: needs the run_dir of the run to continue")
    if run_path is not None:
        if not resume and (run_path / "metrics.jsonl").exists():
            raise ValueError(
                f"run_dir: {run_path} already holds a run (pass resume=True to continue it)"
            )
        run_path.mkdir(parents=True, exist_ok=True)
    if teacher is not None:
        teacher.eval()
    student_before = copy.deepcopy(student) if eval_loader is not None else None

    def terms(batch: Any, settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = labels_fn(batch)
        teacher_logits = None
        if teacher is not None and settings.alpha < 1.0:
            with torch.no_grad():
                teacher_logits = logits_fn(teacher, batch)
        logits, flat_labels = flat_logits(logits_fn(student, batch), labels)
        if teacher_logits is not None:
            teacher_logits = teacher_logits.reshape(logits.shape)  # (N, C)
        parts = logits_distillation_loss(logits, teacher_logits, flat_labels, settings)
        return parts.loss_sum, {
            "ce": parts.ce_sum.detach(),
            "divergence": parts.divergence_sum.detach(),
        }

    plan = None
    if run_path is not None:
        plan = CheckpointPlan(run_path / "checkpoints", checkpoint.every, checkpoint.keep, resume)
    task = ModuleTask(
        student, loader, terms, lambda batch: int((labels_fn(batch) != IGNORE_INDEX).sum()), loss
    )
    history = loop.train(  # the one loop (``train`` here is the TrainConfig argument)
        task,
        train,
        metrics_path=None if run_path is None else run_path / "metrics.jsonl",
        description="distill" if teacher is not None else "labels only",
        checkpoints=plan,
    )
    evaluation = None
    if eval_loader is not None:
        compared = {"student_before": student_before, "student_after": student}
        if teacher is not None:
            compared = {"teacher": teacher, **compared}
        evaluation = {
            name: {
                "params": count_params(model),
                **evaluate_classifier(model, eval_loader, logits_fn, labels_fn, teacher),
            }
            for name, model in compared.items()
        }
    if run_path is not None:
        with atomic_directory(run_path / "student") as tmp:
            save_model(student, str(tmp / "model.safetensors"))
        if evaluation is not None:
            atomic_write_json(
                run_path / "evaluation.json", {"task": "module", "models": evaluation}
            )
            build_report(run_path)
    return ModuleResult(student, history, evaluation, run_path)
