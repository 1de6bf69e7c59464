"""The distillation training loop, in plain PyTorch.

Map of one optimizer step:
  1. draw ``grad_accum`` micro-batches and count their target tokens (the window's normaliser);
  2. per micro-batch: teacher logits under no_grad, student logits, summed loss terms,
     ``backward(loss_sum / window_tokens)``;
  3. clip the global gradient norm, AdamW step, schedule step, one metrics.jsonl record.
Before step 1 of the run, one warm-up micro-batch is timed and measured for the plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.config import LossConfig, TrainConfig
from distill.data import BlockBatches
from distill.io import append_jsonl
from distill.losses import IGNORE_INDEX, LossTerms, distillation_loss
from distill.sysinfo import peak_rss_bytes
from distill.teacher import Teacher
from distill.train.optim import build_optimizer

__all__ = ["TrainState", "student_logits", "train", "labels_for", "measure_warmup"]

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the loop has done so far: the step reached and one record per logged step."""

    step: int = 0
    history: list[dict] = field(default_factory=list)


def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits: ``labels[:, t] = input_ids[:, t + 1]``.

    The last position has no target (``IGNORE_INDEX``). Shape ``[B, T]``.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def student_logits(
    student: PreTrainedModel, input_ids: torch.Tensor, vocab_rows: int
) -> torch.Tensor:
    """Student logits ``[B, T, vocab_rows]``: decoder hidden states, then the output head rows."""
    hidden = student.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
    head = student.get_output_embeddings()
    weight = head.weight[:vocab_rows]
    bias = head.bias[:vocab_rows] if getattr(head, "bias", None) is not None else None
    return torch.nn.functional.linear(hidden, weight, bias)


def micro_batch_terms(
    student: PreTrainedModel,
    teacher: Teacher | None,
    input_ids: torch.Tensor,
    loss_config: LossConfig,
    vocab_rows: int,
) -> LossTerms:
    """Summed loss terms of one micro-batch ``[B, T]``."""
    labels = labels_for(input_ids)
    needs_teacher = loss_config.alpha < 1.0
    teacher_logits = teacher.logits(input_ids) if needs_teacher and teacher is not None else None
    logits = student_logits(student, input_ids, vocab_rows)
    vocab = logits.shape[-1]
    return distillation_loss(
        logits.reshape(-1, vocab),  # (B*T, V)
        None if teacher_logits is None else teacher_logits.reshape(-1, vocab),
        labels.reshape(-1),
        temperature=loss_config.temperature,
        alpha=loss_config.alpha,
    )


def measure_warmup(
    student: PreTrainedModel,
    teacher: Teacher | None,
    input_ids: torch.Tensor,
    loss_config: LossConfig,
    vocab_rows: int,
) -> dict[str, float]:
    """Time a forward + backward micro-batch and read the process's peak RSS afterwards.

    Runs it twice and times the second: the first call pays one-time allocation costs. Gradients
    are discarded and the RNG state restored, so the run is unchanged by it.
    """
    rng_state = torch.get_rng_state()
    for _ in range(2):
        start = time.perf_counter()
        terms = micro_batch_terms(student, teacher, input_ids, loss_config, vocab_rows)
        (terms.loss_sum / max(terms.n_tokens, 1)).backward()
        seconds = time.perf_counter() - start
        student.zero_grad(set_to_none=True)
    torch.set_rng_state(rng_state)
    return {"micro_batch_seconds": seconds, "peak_rss_bytes": float(peak_rss_bytes())}


def train(
    student: PreTrainedModel,
    teacher: Teacher | None,
    batches: BlockBatches,
    loss_config: LossConfig,
    train_config: TrainConfig,
    *,
    vocab_rows: int,
    metrics_path: Path | None = None,
    description: str = "distill",
    on_warmup: Callable[[dict[str, float]], None] | None = None,
) -> TrainState:
    """Train ``student`` in place for ``train_config.steps`` optimizer steps; see the module map."""
    student.train()
    optimizer, scheduler = build_optimizer(student, train_config)
    state = TrainState()
    if on_warmup is not None:
        probe = batches.blocks[: batches.batch_size]
        on_warmup(measure_warmup(student, teacher, probe, loss_config, vocab_rows))
    tokens_per_step = batches.batch_size * batches.blocks.shape[1] * train_config.grad_accum
    bar = tqdm(total=train_config.steps, desc=description, unit="step", dynamic_ncols=True)
    run_start = time.perf_counter()
    while state.step < train_config.steps:
        step_start = time.perf_counter()
        micro_batches = [batches.next_batch() for _ in range(train_config.grad_accum)]
        window_tokens = sum(int((labels_for(ids) != IGNORE_INDEX).sum()) for ids in micro_batches)
        totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        for input_ids in micro_batches:
            terms = micro_batch_terms(student, teacher, input_ids, loss_config, vocab_rows)
            (terms.loss_sum / window_tokens).backward()
            totals["loss"] += terms.loss_sum.item() / window_tokens
            totals["ce"] += terms.ce_sum.item() / window_tokens
            totals["kl"] += terms.kl_sum.item() / window_tokens
        grad_norm = _clip_gradients(student, train_config.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - step_start
        record = {
            "step": state.step,
            **totals,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens_per_step,
            "tokens_per_s": tokens_per_step / seconds,
            "elapsed_s": time.perf_counter() - run_start,
        }
        if state.step % train_config.log_every == 0 or state.step == train_config.steps:
            state.history.append(record)
            if metrics_path is not None:
                append_jsonl(metrics_path, record)
        bar.set_postfix(loss=f"{totals['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
    bar.close()
    student.eval()
    return state


def _clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
