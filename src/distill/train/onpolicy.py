"""On-policy distillation (generalized KD): with probability ``lambda`` a micro-batch's
continuations are written by the student itself, and the teacher grades those.

The prompts are the batch's own (a block's first ``prompt_tokens`` tokens; a chat up to its first
assistant token). The student samples a continuation for each with its KV cache; the new batch is
prompt + continuation, right-padded, and its targets are the generated tokens only, so the loss
(the divergence alone: there are no labels to imitate) is taken where the student chose the words.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from distill.config import OnPolicyConfig
from distill.data import Batch
from distill.losses import IGNORE_INDEX
from distill.sampling import Sampling, sample_continuations

__all__ = ["OnPolicy", "student_batch"]


def student_batch(
    student: PreTrainedModel,
    batch: Batch,
    sampling: Sampling,
    *,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
) -> tuple[Batch, list[int]]:
    """The batch's prompts continued by ``student``; returns it and each continuation's length.

    ``labels[t] = input_ids[t + 1]`` exactly where token ``t + 1`` was generated; each row
    keeps its teacher route (several teachers).
    """
    prompts = [
        row[:length].tolist()
        for row, length in zip(batch.input_ids, batch.prompt_lengths.tolist(), strict=True)
    ]
    continuations = sample_continuations(
        student, prompts, sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    width = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations, strict=True)):
        sequence = torch.tensor(prompt + continuation, dtype=torch.long)
        input_ids[row, : len(sequence)] = sequence
        if continuation:  # targets: positions len(prompt)-1 .. end-2 predict the generated tokens
            labels[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(continuation)
    device = batch.input_ids.device
    on_policy = Batch(input_ids.to(device), labels, batch.prompt_lengths, batch.teachers)
    return on_policy, [len(c) for c in continuations]


@dataclass
class OnPolicy:
    """The on-policy settings of a run and the coin it flips per micro-batch (its own seeded
    generator, saved in checkpoints, so ``lambda = 0`` leaves every other RNG untouched)."""

    config: OnPolicyConfig
    eos_token_id: int | list[int] | None
    pad_token_id: int
    seed: int = 0
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + 7919)

    @property
    def sampling(self) -> Sampling:
        cfg = self.config
        return Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p)

    def draw(self) -> bool:
        """True with probability ``lambda`` (no draw at all when lambda is 0)."""
        if self.config.lambda_ <= 0.0:
            return False
        return bool(torch.rand((), generator=self.generator) < self.config.lambda_)

    def continue_batch(self, student: PreTrainedModel, batch: Batch) -> tuple[Batch, list[int]]:
        return student_batch(
            student,
            batch,
            self.sampling,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
