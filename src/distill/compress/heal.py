"""Healing after pruning, and quantization-aware distillation: a short distillation of the
compressed student from the teacher through the one training loop (``train.loop.train`` with a
``CausalLMTask``).

What makes the student compressed stays on as a reparametrisation during the training: PyTorch's
pruning masks (``weight = weight_orig * mask``: the zeros survive) and, for QAD, the
fake-quantization parametrizations of :mod:`distill.compress.qad` (every forward sees the
quantized grid, the optimizer updates the float weights underneath). The caller bakes them in
afterwards. ``checkpoints`` gives the loop's exact checkpoint / resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from distill.config import LossConfig, TrainConfig
from distill.data import BlockBatches
from distill.teacher import Teacher
from distill.train import CausalLMTask, CheckpointPlan, train

__all__ = ["heal"]


def heal(
    student: PreTrainedModel,
    teacher: Teacher,
    train_blocks: torch.Tensor,
    *,
    steps: int,
    lr: float,
    loss_config: LossConfig,
    train_config: TrainConfig,
    seed: int,
    metrics_path: Path | None = None,
    checkpoints: CheckpointPlan | None = None,
    description: str = "heal",
) -> None:
    """Distil ``student`` (pruned / fake-quantized, reparametrisations attached) from ``teacher``
    for ``steps`` steps in place."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    config = train_config.model_copy(
        update={
            "steps": steps,
            "lr": lr,
            "warmup_steps": min(train_config.warmup_steps, steps // 10),
        }
    )
    batches = BlockBatches(train_blocks, config.batch_size, seed)
    train(
        CausalLMTask(student, teacher, batches, loss_config, vocab_rows=teacher.vocab_rows),
        config,
        metrics_path=metrics_path,
        description=description,
        checkpoints=checkpoints,
    )
