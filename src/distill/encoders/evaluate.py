"""Held-out evaluation of encoders: accuracy / macro-F1, cosine to the teacher, retrieval
agreement, and encode speed."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "accuracy_macro_f1",
    "mean_cosine",
    "retrieval_agreement",
    "texts_per_second",
]


def accuracy_macro_f1(
    predictions: torch.Tensor, labels: torch.Tensor, num_labels: int
) -> dict[str, float]:
    """Accuracy and macro-F1: the unweighted mean over classes of F1 = 2TP / (2TP + FP + FN),
    leaving out classes that appear neither in the labels nor in the predictions."""
    accuracy = float((predictions == labels).float().mean())
    scores = []
    for c in range(num_labels):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(scores) / len(scores)}


def mean_cosine(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean over rows of cos(student_i, teacher_i); ``[N, H]`` each."""
    return float(F.cosine_similarity(student, teacher, dim=-1).mean())


def _neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` indices of each row's k nearest other rows by cosine similarity."""
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T  # (N, N)
    similarity.fill_diagonal_(float("-inf"))
    return similarity.topk(k, dim=-1).indices


def retrieval_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> float:
    """Mean over queries of |top-k(student) ∩ top-k(teacher)| / k, each held-out sentence being a
    query against all the others (itself excluded)."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError("student and teacher must embed the same sentences")
    if not 1 <= k < student.shape[0]:
        raise ValueError(f"k: must be in [1, {student.shape[0] - 1}], got {k}")
    s, t = _neighbours(student, k), _neighbours(teacher, k)
    overlaps = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(s, t, strict=True)]
    return sum(overlaps) / (k * len(overlaps))


def texts_per_second(encode_fn: Callable[[], object], n_texts: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls of ``encode_fn`` (which encodes ``n_texts`` texts)."""
    encode_fn()  # warm-up: allocator, kernels
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encode_fn()
        best = min(best, time.perf_counter() - start)
    return n_texts / best
