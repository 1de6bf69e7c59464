"""Classifier quality: accuracy, cross-entropy, and KL / top-1 agreement with a teacher."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import IGNORE_INDEX

__all__ = ["LabelsFn", "LogitsFn", "default_labels", "evaluate_classifier", "flat_logits"]

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]
LabelsFn = Callable[[Any], torch.Tensor]


def default_labels(batch: Any) -> torch.Tensor:
    """Labels of a ``(inputs, labels)`` tuple/list or of a dict with ``labels`` (or ``label``)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        for key in ("labels", "label"):
            if key in batch:
                return batch[key]
    raise ValueError(
        "labels_fn: cannot find labels in the batch (expected (inputs, labels) or a dict with "
        "'labels'); pass labels_fn=..."
    )


def flat_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., C]`` logits and ``[...]`` labels as ``[N, C]`` and ``[N]``."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits_fn: logits shape {tuple(logits.shape)} does not match labels shape "
            f"{tuple(labels.shape)} plus a class dimension"
        )
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable,
    logits_fn: LogitsFn,
    labels_fn: LabelsFn = default_labels,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy on labelled items; with a teacher, also the mean
    KL(teacher || model) and top-1 agreement with the teacher (temperature 1)."""
    model.eval()
    correct = agree = total = 0
    ce_sum = kl_sum = 0.0
    for batch in loader:
        logits, labels = flat_logits(logits_fn(model, batch).float(), labels_fn(batch))
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep], labels[keep]
        total += labels.numel()
        correct += int((logits.argmax(-1) == labels).sum())
        ce_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        if teacher is not None:
            teacher_logits = logits_fn(teacher, batch).float().reshape(-1, logits.shape[-1])[keep]
            agree += int((logits.argmax(-1) == teacher_logits.argmax(-1)).sum())
            kl_sum += float(
                F.kl_div(
                    F.log_softmax(logits, -1),
                    F.log_softmax(teacher_logits, -1),
                    reduction="sum",
                    log_target=True,
                )
            )
    if total == 0:
        raise ValueError("eval_loader: holds no labelled items")
    metrics = {"accuracy": correct / total, "cross_entropy": ce_sum / total}
    if teacher is not None:
        metrics |= {"kl_to_teacher": kl_sum / total, "top1_agreement": agree / total}
    return metrics
