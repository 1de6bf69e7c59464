"""Healing after pruning: a short distillation with the ordinary training loop, masks kept.

PyTorch's pruning reparametrisation (``weight = weight_orig * mask``) stays on during healing,
so the optimizer updates ``weight_orig`` while every forward still sees the pruned weights: the
zeros survive. ``make_permanent`` is called by the caller afterwards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from distill.config import LossConfig, TrainConfig
from distill.data import BlockBatches
from distill.teacher import Teacher
from distill.train import CausalLMTask, train

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
) -> None:
    """Distil ``student`` (pruned, masks attached) from ``teacher`` for ``steps`` steps in place."""
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
        description="heal",
    )
