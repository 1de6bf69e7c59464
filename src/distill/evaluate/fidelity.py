"""Fidelity to the teacher: how close a student stays to it, on held-out sets of the training
domain and of others.

- :class:`FidelityProbe`: KL(teacher || student) and top-1 agreement on a few blocks of each
  held-out set, cheap enough to run every ``eval.every`` training steps. It leaves the run
  unchanged: no gradients, the model's train/eval mode and every RNG state restored.
- :func:`sample_fidelity`: the teacher's NLL of what each model writes from held-out prefixes
  (:func:`block_prompts`).
- :func:`memorising`: whether a student's held-out perplexity has fallen below the teacher's
  (it fits the data rather than the teacher).
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from distill.data.extra import spread
from distill.evaluate.heldout import heldout_metrics
from distill.evaluate.samples import score_student_samples
from distill.sampling import Sampling
from distill.teacher import LiveTeacher
from distill.train.checkpoint import rng_state, set_rng_state

__all__ = [
    "FidelityProbe",
    "MEMORISATION_RATIO",
    "block_prompts",
    "memorising",
    "sample_fidelity",
]

# A student whose held-out perplexity is below this share of the teacher's is flagged: it
# predicts the corpus better than the teacher does, which distillation alone cannot achieve.
# (Some margin, so that a student level with the teacher is not flagged by noise.)
MEMORISATION_RATIO = 0.9


def memorising(student: dict, teacher: dict) -> bool:
    """Whether the student's held-out ``perplexity`` is below ``MEMORISATION_RATIO`` x the
    teacher's (metrics dicts as in evaluation.json)."""
    mine, theirs = student.get("perplexity"), teacher.get("perplexity")
    return mine is not None and theirs is not None and mine < MEMORISATION_RATIO * theirs


class FidelityProbe:
    """Scores a model against a live teacher on ``sets`` (``{name: (blocks [n, T], labels
    [n, T] or None)}``; labels choose the scored positions, as in :func:`heldout_metrics`).

    Call it on rank 0 with an unsharded model (FSDP: every rank holds only a shard, so the
    caller turns the probe off there)."""

    def __init__(
        self,
        sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        teacher: LiveTeacher,
        *,
        vocab_rows: int,
        batch_size: int,
    ):
        self.sets = {name: pair for name, pair in sets.items() if pair[0].shape[0]}
        self.teacher = teacher
        self.vocab_rows = vocab_rows
        self.batch_size = batch_size

    def __call__(self, model: PreTrainedModel) -> dict[str, dict[str, float]]:
        """``{set: {kl_to_teacher, top1_agreement}, "seconds": s}``; the run is unchanged."""
        start = time.perf_counter()
        states = rng_state()
        training = model.training
        try:
            results: dict = {}
            for name, (blocks, labels) in self.sets.items():
                scores = heldout_metrics(
                    {"student": model},
                    self.teacher,
                    blocks,
                    vocab_rows=self.vocab_rows,
                    batch_size=self.batch_size,
                    labels=labels,
                    progress=False,
                )["student"]
                results[name] = {
                    "kl_to_teacher": scores["kl_to_teacher"],
                    "top1_agreement": scores["top1_agreement"],
                }
        finally:
            model.train(training)
            set_rng_state(states)
        results["seconds"] = time.perf_counter() - start
        return results


def block_prompt_tokens(block_size: int) -> int:
    """How many first tokens of a packed block prompt a sample: a quarter, at most 16."""
    return max(1, min(16, block_size // 4))


def block_prompts(blocks: torch.Tensor, count: int) -> list[list[int]]:
    """The first tokens (:func:`block_prompt_tokens`) of ``count`` evenly spread blocks."""
    return spread(blocks, count)[:, : block_prompt_tokens(blocks.shape[1])].tolist()


def sample_fidelity(
    models: dict[str, PreTrainedModel],
    teacher: LiveTeacher,
    prompts: list[list[int]],
    *,
    new_tokens: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    seed: int,
) -> dict[str, float]:
    """``{name: teacher_nll}``: each model continues ``prompts``, sampling at T = 1 from the
    same seed; the teacher's mean negative log-likelihood per generated token (lower: the model
    writes more like the teacher). ``models`` may include the teacher itself (its own entropy
    rate, the floor a student can be compared with)."""
    sampling = Sampling(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
    return {
        name: score_student_samples(
            model.eval(),
            teacher,
            prompts,
            sampling,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            seed=seed,
        )["teacher_nll"]
        for name, model in models.items()
    }
