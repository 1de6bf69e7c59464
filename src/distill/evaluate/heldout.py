"""Held-out quality: perplexity, KL(teacher || model) per token and top-1 agreement.

All models are scored on the same blocks in one pass, so the teacher runs once per batch.
Sums are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.losses import IGNORE_INDEX
from distill.teacher import Teacher
from distill.train.causal_lm import labels_for, student_logits

__all__ = ["heldout_metrics", "heldout_perplexity", "heldout_quality", "model_logits"]


def heldout_metrics(
    models: dict[str, PreTrainedModel],
    teacher: Teacher,
    blocks: torch.Tensor,
    *,
    vocab_rows: int,
    batch_size: int,
    labels: torch.Tensor | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """``{name: {perplexity, kl_to_teacher, top1_agreement, top5_agreement}}`` for the teacher
    and each model, the students scored through their decoder + output-head rows (as trained).

    ``labels`` ``[n, T]`` choose the scored positions (chat data: the assistant's tokens);
    default every next token of the blocks."""
    return _score(models, teacher, blocks, vocab_rows, batch_size, student_logits, progress, labels)


@torch.no_grad()
def heldout_perplexity(
    models: dict[str, PreTrainedModel],
    blocks: torch.Tensor,
    *,
    vocab_rows: int,
    batch_size: int,
    labels: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """``{name: {perplexity}}`` of models that share one tokenizer, with no teacher (a
    cross-tokenizer run's students on their own tokens; ``labels`` as in
    :func:`heldout_metrics`). Per token of that tokenizer: comparable between these models only."""
    nll = dict.fromkeys(models, 0.0)
    n_tokens = 0
    for start in range(0, blocks.shape[0], batch_size):
        input_ids = blocks[start : start + batch_size]
        targets = (
            labels_for(input_ids) if labels is None else labels[start : start + batch_size]
        ).reshape(-1)
        keep = targets != IGNORE_INDEX
        n_tokens += int(keep.sum())
        for name, model in models.items():
            logits = student_logits(model.eval(), input_ids.to(model.device), vocab_rows)
            rows = logits.reshape(-1, vocab_rows)[keep.to(logits.device)].double()
            nll[name] += float(
                F.cross_entropy(rows, targets[keep].to(rows.device), reduction="sum")
            )
    return {name: {"perplexity": math.exp(total / max(n_tokens, 1))} for name, total in nll.items()}


def model_logits(model: PreTrainedModel, input_ids: torch.Tensor, vocab_rows: int) -> torch.Tensor:
    """Logits ``[B, T, vocab_rows]`` from the model's own forward (works for quantized heads)."""
    return model(input_ids=input_ids, use_cache=False).logits[..., :vocab_rows].float()


def heldout_quality(
    models: dict[str, PreTrainedModel],
    teacher: Teacher,
    blocks: torch.Tensor,
    *,
    vocab_rows: int,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Like :func:`heldout_metrics`, for any model with a forward.

    ``top5_agreement``: share of tokens whose teacher top-1 token is among the model's 5 most
    likely tokens. Models are run through their own forward (not the head weight), so int8 and
    GGUF-loaded models are scored the same way as float ones.
    """
    return _score(models, teacher, blocks, vocab_rows, batch_size, model_logits, progress=False)


@torch.no_grad()
def _score(
    models: dict[str, PreTrainedModel],
    teacher: Teacher,
    blocks: torch.Tensor,
    vocab_rows: int,
    batch_size: int,
    logits_fn: Callable[[PreTrainedModel, torch.Tensor, int], torch.Tensor],
    progress: bool,
    all_labels: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    names = ["teacher", *models]
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0, "agree5": 0.0} for name in names}
    n_tokens = 0
    starts = range(0, blocks.shape[0], batch_size)
    bar_options = {} if progress else {"disable": True}
    for start in tqdm(starts, desc="evaluate", unit="batch", **bar_options):
        input_ids = blocks[start : start + batch_size]
        labels = (
            labels_for(input_ids) if all_labels is None else all_labels[start : start + batch_size]
        ).reshape(-1)
        device = teacher.model.device if hasattr(teacher, "model") else input_ids.device
        input_ids, labels = input_ids.to(device), labels.to(device)
        keep = labels != IGNORE_INDEX
        targets = labels[keep]
        teacher_logprobs = F.log_softmax(
            teacher.logits(input_ids).reshape(-1, vocab_rows)[keep].double(), dim=-1
        )  # (n, V)
        teacher_top1 = teacher_logprobs.argmax(dim=-1)
        n_tokens += int(keep.sum())
        for name in names:
            if name == "teacher":
                logprobs = teacher_logprobs
            else:
                model = models[name].eval()
                logits = logits_fn(model, input_ids.to(model.device), vocab_rows).to(device)
                logprobs = F.log_softmax(logits.reshape(-1, vocab_rows)[keep].double(), dim=-1)
            sums[name]["nll"] -= float(logprobs.gather(1, targets[:, None]).sum())
            kl_rows = (teacher_logprobs.exp() * (teacher_logprobs - logprobs)).sum(dim=-1)
            sums[name]["kl"] += float(kl_rows.sum())
            sums[name]["agree"] += float((logprobs.argmax(dim=-1) == teacher_top1).sum())
            top5 = logprobs.topk(min(5, vocab_rows), dim=-1).indices  # (n, 5)
            sums[name]["agree5"] += float((top5 == teacher_top1[:, None]).any(dim=-1).sum())
    return {
        name: {
            "perplexity": math.exp(values["nll"] / n_tokens),
            "kl_to_teacher": values["kl"] / n_tokens,
            "top1_agreement": values["agree"] / n_tokens,
            "top5_agreement": values["agree5"] / n_tokens,
        }
        for name, values in sums.items()
    }
