"""A student from a :class:`StudentConfig`: fixed or searched layers, then optional width
pruning; and its size and cost against the teacher (parameters, bytes, FLOPs per token)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from distill.config import StudentConfig
from distill.errors import ConfigError
from distill.models import count_params
from distill.student.depth import build_student, check_supported, select_layers
from distill.student.search import search_layers
from distill.student.width import WidthTargets, measure_importance, prune_width

__all__ = ["StudentBuild", "needs_calibration", "make_student", "flops_per_token", "model_cost"]

log = logging.getLogger(__name__)


@dataclass
class StudentBuild:
    model: PreTrainedModel
    layers: list[int]  # teacher layer each student layer was copied from


def width_targets(config: StudentConfig) -> WidthTargets:
    return WidthTargets(config.ffn, config.heads, config.kv_heads, config.hidden)


def needs_calibration(config: StudentConfig) -> bool:
    """Whether building this student reads calibration blocks (a search or width pruning)."""
    return config.path is None and (_searching(config) or width_targets(config) != WidthTargets())


def _searching(config: StudentConfig) -> bool:
    return config.search != "none" and config.layers is None and config.every_k is None


def make_student(
    teacher: PreTrainedModel, config: StudentConfig, calibration: torch.Tensor | None = None
) -> StudentBuild:
    """Build the student ``config`` describes from ``teacher`` (not modified).

    ``calibration`` ``[B, T]``: token blocks for the layer search and width importance (needed
    when :func:`needs_calibration`); the search reads the first ``search_tokens`` of each.
    """
    if needs_calibration(config) and calibration is None:
        raise ValueError("calibration: blocks are needed for a layer search or width pruning")
    num_layers = teacher.config.num_hidden_layers
    if _searching(config):
        n_keep = config.num_layers or config.keep_first + config.keep_last
        if n_keep > num_layers:
            raise ConfigError(
                f"student.num_layers = {n_keep} exceeds the teacher's {num_layers} layers"
            )
        check_supported(teacher, "student.search")
        search_ids = calibration[:, : config.search_tokens]  # (B, search_tokens)
        layers = search_layers(teacher, search_ids, n_keep, config.search)
        log.info("student.search=%s keeps teacher layers %s", config.search, layers)
    else:
        layers = select_layers(num_layers, config)
        log.info("student keeps teacher layers %s", layers)
    student = build_student(teacher, layers)
    targets = width_targets(config)
    if targets != WidthTargets():
        try:
            student = prune_width(student, measure_importance(student, calibration), targets)
        except ValueError as err:
            raise ConfigError(f"student width: {err}") from None
    return StudentBuild(student, layers)


def flops_per_token(model: PreTrainedModel, context: int) -> float:
    """Forward FLOPs per token at ``context`` tokens of context: 2 x every matmul weight
    (decoder Linears and the output head) + 4 x context x heads x head_dim per layer for the
    attention scores and their weighted sum."""
    config = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * context * config.num_attention_heads * head_dim * config.num_hidden_layers
    return float(2 * matmul + attention)


def model_cost(model: PreTrainedModel, context: int) -> dict[str, float]:
    """Parameters, float32 weight bytes and forward FLOPs per token of ``model``."""
    params = count_params(model)
    bytes_ = sum(
        t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values()
    )
    return {"params": params, "bytes": bytes_, "flops_per_token": flops_per_token(model, context)}
