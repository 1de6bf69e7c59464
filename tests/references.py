"""Slow, plain reference implementations the fast paths are held to (float64)."""

from __future__ import annotations

import torch


def reference_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The seed formula, token by token, averaged over unmasked tokens:

    alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))
    """
    total = student_logits.new_zeros((), dtype=torch.float64)
    count = 0
    for row in range(student_logits.shape[0]):
        label = int(labels[row])
        if label == ignore_index:
            continue
        s = student_logits[row].double()
        t = teacher_logits[row].double()
        log_q = s - torch.log(torch.exp(s - s.max()).sum()) - s.max()
        ce = -log_q[label]
        s_t, t_t = s / temperature, t / temperature
        p = torch.exp(t_t - t_t.max()) / torch.exp(t_t - t_t.max()).sum()
        q = torch.exp(s_t - s_t.max()) / torch.exp(s_t - s_t.max()).sum()
        kl = (p * (torch.log(p) - torch.log(q))).sum()
        total = total + alpha * ce + (1 - alpha) * temperature**2 * kl
        count += 1
    return total / count


def _reference_softmax(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits.double() - logits.double().max()
    return torch.exp(shifted) / torch.exp(shifted).sum()


def reference_divergence(
    p: torch.Tensor, q: torch.Tensor, divergence: str, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """One row's divergence from its textbook formula; ``p`` teacher, ``q`` student probabilities."""

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * torch.log(a / b)).sum()

    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if (
        divergence == "jsd"
    ):  # GKD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if divergence == "skew_forward_kl":  # DistiLLM
        return kl(p, skew * p + (1 - skew) * q)
    if divergence == "skew_reverse_kl":
        return kl(q, skew * q + (1 - skew) * p)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum()
    raise ValueError(divergence)


def reference_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Token by token, averaged over unmasked tokens:
    ``alpha * CE(student, label) + (1 - alpha) * (T^2 or 1) * D(p_T, q_T)``."""
    scale = temperature**2 if scale_by_t2 else 1.0
    total = student_logits.new_zeros((), dtype=torch.float64)
    count = 0
    for row in range(student_logits.shape[0]):
        label = int(labels[row])
        if label == ignore_index:
            continue
        ce = -torch.log(_reference_softmax(student_logits[row])[label])
        p = _reference_softmax(teacher_logits[row] / temperature)
        q = _reference_softmax(student_logits[row] / temperature)
        soft = reference_divergence(p, q, divergence, beta, skew)
        total = total + alpha * ce + (1 - alpha) * scale * soft
        count += 1
    return total / count


def reference_split_by_hash(
    keys: list[str], heldout_fraction: float, sizes: list[int]
) -> tuple[list[int], list[int]]:
    """The held-out split, item by item: in order of the sha256 hex digest of each key (ties by
    index), items are held out until their sizes reach the share, one kept for training."""
    import hashlib

    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(keys[i].encode()).hexdigest())
    target = heldout_fraction * sum(sizes)
    heldout: set[int] = set()
    held_size = 0
    for index in order:
        if held_size >= target or len(heldout) == len(keys) - 1:
            break
        heldout.add(index)
        held_size += sizes[index]
    return [i for i in range(len(keys)) if i not in heldout], sorted(heldout)
