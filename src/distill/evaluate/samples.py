"""The teacher's view of what a student writes: sample continuations from the student, then
score every generated token with the teacher.

``teacher_nll`` is the teacher's negative log-likelihood of the student's sampled tokens (how
likely the teacher finds them); ``reverse_kl`` is KL(student || teacher) at those positions (the
exposure-bias view that on-policy distillation optimises). Both are means per generated token,
accumulated in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.data import Batch
from distill.losses import IGNORE_INDEX
from distill.sampling import Sampling
from distill.teacher import LiveTeacher
from distill.train.onpolicy import student_batch

__all__ = ["score_student_samples"]


@torch.no_grad()
def score_student_samples(
    student: PreTrainedModel,
    teacher: LiveTeacher,
    prompts: list[list[int]],
    sampling: Sampling,
    *,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """``{teacher_nll, reverse_kl, generated_tokens_mean}`` over continuations of ``prompts``."""
    vocab_rows = teacher.vocab_rows
    nll_sum, kl_sum, n_tokens = 0.0, 0.0, 0
    torch.manual_seed(seed)
    for start in tqdm(range(0, len(prompts), batch_size), desc="score samples", unit="batch"):
        chunk = prompts[start : start + batch_size]
        width = max(len(prompt) for prompt in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(chunk):
            input_ids[row, : len(prompt)] = torch.tensor(prompt)
        prompt_batch = Batch(input_ids, input_ids.clone(), torch.tensor([len(p) for p in chunk]))
        sampled, _ = student_batch(
            student, prompt_batch, sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        labels = sampled.labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        teacher_logprobs = F.log_softmax(
            teacher.logits(sampled.input_ids).reshape(-1, vocab_rows)[keep].double(), dim=-1
        )  # (n, V)
        student_logits = student(input_ids=sampled.input_ids, use_cache=False).logits
        student_logprobs = F.log_softmax(
            student_logits[..., :vocab_rows].reshape(-1, vocab_rows)[keep].double(), dim=-1
        )  # (n, V)
        nll_sum -= float(teacher_logprobs.gather(1, labels[keep][:, None]).sum())
        kl_sum += float((student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum())
        n_tokens += int(keep.sum())
    return {
        "teacher_nll": nll_sum / n_tokens,
        "reverse_kl": kl_sum / n_tokens,
        "generated_tokens_mean": n_tokens / len(prompts),
    }
