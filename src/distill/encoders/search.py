"""Which teacher layers an encoder student keeps, scored on calibration batches."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from distill.encoders.models import encoder_layer_count, keeping_layers
from distill.encoders.pooling import pool
from distill.errors import ConfigError
from distill.student.search import greedy_removal

__all__ = ["search_encoder_layers"]

# Candidates scored exhaustively up to this many combinations, else by greedy removal.
_EXHAUSTIVE_LIMIT = 128


@torch.no_grad()
def search_encoder_layers(
    teacher: PreTrainedModel,
    batches: list[dict[str, torch.Tensor]],
    keep: int,
    task: str,
    pooling_mode: str = "mean",
) -> tuple[list[int], float]:
    """The ``keep`` teacher layers whose layer-dropped student (before training) is closest to
    the teacher on calibration ``batches``, and its score: the mean cosine between pooled
    embeddings (embedding) or minus the mean KL(teacher || student) of the class
    probabilities (classification). Every combination is scored when there are at most 128
    of them (20 for 3 of 6 layers), else layers are dropped greedily, one at a time, the one
    whose removal scores best (:func:`distill.student.search.greedy_removal`); ties go to the
    earlier candidate. Candidates share the teacher's layers (no copies)."""
    teacher.eval()
    total = encoder_layer_count(teacher)
    if not 1 <= keep <= total:
        raise ConfigError(f"student.num_layers: must be in [1, {total}], got {keep}")

    def outputs(model: PreTrainedModel) -> list[torch.Tensor]:
        if task == "classification":
            return [model(**batch).logits.log_softmax(-1) for batch in batches]  # (B, C)
        return [
            pool(model(**batch).last_hidden_state, batch["attention_mask"], pooling_mode)
            for batch in batches
        ]  # (B, H) each

    reference = outputs(teacher)

    def score(layers: list[int]) -> float:
        with keeping_layers(teacher, layers):
            candidate = outputs(teacher)
        if task == "classification":
            kl = sum(
                float(F.kl_div(c, r, reduction="sum", log_target=True))
                for c, r in zip(candidate, reference, strict=True)
            )
            return -kl / sum(r.shape[0] for r in reference)
        cosines = torch.cat(
            [F.cosine_similarity(c, r, dim=-1) for c, r in zip(candidate, reference, strict=True)]
        )
        return float(cosines.mean())

    if math.comb(total, keep) <= _EXHAUSTIVE_LIMIT:
        candidates = [list(c) for c in itertools.combinations(range(total), keep)]
        scores = [score(layers) for layers in candidates]
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))  # ties: the first
        return candidates[best], scores[best]

    def removal_losses(current: list[int]) -> list[float]:
        return [-score([x for x in current if x != drop]) for drop in current]

    layers, trace = greedy_removal(total, keep, removal_losses, "encoder layer search")
    return layers, -trace[-1] if trace else score(layers)
