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
