"""Sampling continuations from a causal LM with its KV cache: the one generation routine that
``distill generate`` (teacher responses) and on-policy distillation (student samples) share.

Prompts of different lengths are left-padded for ``generate`` (with an attention mask), and each
returned continuation is cut right after its first EOS, so it holds at most ``max_new_tokens``
tokens and nothing after an EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

__all__ = ["Sampling", "sample_continuations"]


@dataclass(frozen=True)
class Sampling:
    """How to sample: ``temperature`` 0 means greedy decoding; ``top_p`` 1 keeps every token."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


@torch.no_grad()
def sample_continuations(
    model: PreTrainedModel,
    prompts: list[list[int]],
    sampling: Sampling,
    *,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
) -> list[list[int]]:
    """One sampled continuation per prompt (token ids, without the prompt), EOS included.

    Uses the global torch RNG, so a seeded run samples the same tokens again.
    """
    if not prompts:
        return []
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(prompt) for prompt in prompts)
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: the prompts end at the same column
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    greedy = sampling.temperature == 0.0
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
    )  # (B, width + new)
    model.train(was_training)
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    continuations = []
    for row in output[:, width:].tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        continuations.append(row[:cut])
    return continuations
