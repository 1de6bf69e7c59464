"""Quantization-aware distillation (QAD): the student trains with fake-quantized weights against
the float teacher, then is quantized for real on the grid recomputed from its final weights.

Every quantized weight gets a :class:`~distill.compress.quantize.FakeQuantize` parametrization:
the forward sees the int8-row or int4-group grid (scales recomputed from the current weight each
step), the backward passes the gradient straight through to the float weight inside the grid's
range (zero outside). Training is the ordinary distillation of :func:`distill.compress.heal.heal`
(the one loop, a ``CausalLMTask``, checkpoints and exact resume). :func:`detach_fake_quantize`
then leaves the float weights after the last update; their real quantization is the grid the
fake quantization gives those weights (the last step's forward saw the grid before the update).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from distill.compress.heal import heal
from distill.compress.quantize import FakeQuantize
from distill.compress.store import QuantizeSpec
from distill.config import LossConfig, TrainConfig
from distill.errors import ConfigError
from distill.teacher import Teacher
from distill.train import CheckpointPlan

__all__ = ["attach_fake_quantize", "detach_fake_quantize", "quantization_aware_distill"]


def _targets(model: PreTrainedModel, spec: QuantizeSpec) -> dict[str, FakeQuantize]:
    """Module name -> the parametrization of its weight, matching what ``save_model`` stores."""
    bits = 4 if spec.method == "int4" else 8
    outliers = spec.outliers if spec.method == "int8" else {}
    names = {module: name for name, module in model.named_modules()}
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    targets: dict[str, FakeQuantize] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or name in spec.keep_float:
            continue
        targets[name] = FakeQuantize(
            bits, spec.group_size, spec.smooth.get(name), outliers.get(name)
        )
    if spec.head:  # int8 rows: the embedding, and the head (tied: the same rows)
        tied = head.weight is embedding.weight
        head_outliers = outliers.get(names[head])
        targets[names[embedding]] = FakeQuantize(8, outlier_index=head_outliers if tied else None)
        if names[head] not in spec.keep_float or tied:
            targets[names[head]] = FakeQuantize(8, outlier_index=head_outliers)
    return targets


def attach_fake_quantize(model: PreTrainedModel, spec: QuantizeSpec) -> list[str]:
    """Register the fake quantization of ``spec`` on ``model``'s weights; return their modules."""
    targets = _targets(model, spec)
    for name, fake in targets.items():
        parametrize.register_parametrization(model.get_submodule(name), "weight", fake)
    return list(targets)


def detach_fake_quantize(model: PreTrainedModel) -> None:
    """Remove every fake quantization, keeping the trained float weights underneath (ties kept)."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    model.tie_weights()


def quantization_aware_distill(
    student: PreTrainedModel,
    teacher: Teacher | None,
    train_blocks: torch.Tensor,
    spec: QuantizeSpec,
    *,
    steps: int,
    lr: float,
    loss_config: LossConfig,
    train_config: TrainConfig,
    seed: int,
    metrics_path: Path | None = None,
    checkpoints: CheckpointPlan | None = None,
) -> None:
    """Distil ``student`` through the fake-quantized grid of ``spec`` for ``steps`` steps, in
    place; afterwards its float weights quantize (``save_model(quantize=spec)``) to that grid."""
    if teacher is None:
        raise ConfigError("QAD distils from the float teacher: no teacher given")
    if loss_config.alpha >= 1.0:
        raise ConfigError("QAD distils from the teacher: loss.alpha=1 uses labels only; set < 1")
    attach_fake_quantize(student, spec)
    try:
        heal(
            student,
            teacher,
            train_blocks,
            steps=steps,
            lr=lr,
            loss_config=loss_config,
            train_config=train_config,
            seed=seed,
            metrics_path=metrics_path,
            checkpoints=checkpoints,
            description="qad",
        )
    finally:
        detach_fake_quantize(student)
