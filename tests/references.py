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


def reference_group_distribution(
    logits: torch.Tensor, tokens: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """One side's distribution of one aligned group over ``V + 1`` outcomes, from its
    definition: ``logits`` ``[n, V]`` are the rows predicting the group's ``n`` tokens in turn.
    Alternatives of the first token keep their probability; the first token's entry holds the
    chain-rule product ``prod_i p_i(x_i)``; the last entry (the bucket) ``p_1(x_1) - product``."""
    steps = [_reference_softmax(row / temperature) for row in logits]
    product = torch.ones((), dtype=torch.float64)
    for step, token in zip(steps, tokens, strict=True):
        product = product * step[token]
    first = steps[0].clone()
    bucket = first[tokens[0]] - product
    first[tokens[0]] = product
    return torch.cat([first, bucket.reshape(1)])


def reference_cached_group_distribution(
    logits: torch.Tensor, tokens: list[int], k: int, temperature: float = 1.0
) -> torch.Tensor:
    """:func:`reference_group_distribution` as a teacher cache rebuilds it: the first row's k
    largest probabilities and its first token's exact, the rest of that row's mass shared
    equally by its other ids; the chunk and the bucket exact (realised tokens)."""
    exact = reference_group_distribution(logits, tokens, temperature)
    vocab = logits.shape[1]
    known = set(torch.topk(logits[0], k).indices.tolist()) | {tokens[0]}
    first_step = _reference_softmax(logits[0] / temperature)
    others = [v for v in range(vocab) if v not in known]
    rebuilt = exact.clone()
    for v in others:
        rebuilt[v] = (1 - sum(first_step[i] for i in known)) / len(others)
    return rebuilt


def reference_uld(p: torch.Tensor, q: torch.Tensor, top_k: int | None = None) -> float:
    """ULD of two probability vectors: sorted decreasingly, zero-padded, L1, element by element;
    with ``top_k`` only the first k of each, plus ``|rest of p - rest of q|``."""
    a = sorted(p.double().tolist(), reverse=True)
    b = sorted(q.double().tolist(), reverse=True)
    width = max(len(a), len(b))
    a += [0.0] * (width - len(a))
    b += [0.0] * (width - len(b))
    if top_k is None or top_k >= width:
        return sum(abs(x - y) for x, y in zip(a, b, strict=True))
    head = sum(abs(x - y) for x, y in zip(a[:top_k], b[:top_k], strict=True))
    return head + abs(sum(a[top_k:]) - sum(b[top_k:]))


def reference_hybrid(
    p: torch.Tensor,
    q: torch.Tensor,
    teacher_first: int,
    student_first: int,
    pairs: list[tuple[int, int]],
    joined: frozenset[int] = frozenset(),
) -> float:
    """The hybrid divergence of one group from its definition: ``p`` ``[Vt + 1]`` and ``q``
    ``[Vs + 1]`` group distributions, ``pairs`` (teacher id, student id) of equal tokens. The
    matched outcomes are the chunk (the two first tokens) and the pairs that touch neither
    first token; KL of both sides renormalised over them, plus ULD of everything else.
    ``joined``: teacher ids whose matched pairs are one outcome of the KL (a cache's ids outside
    its top-k)."""
    matched = [(teacher_first, student_first)] + [
        (t, s) for t, s in pairs if t != teacher_first and s != student_first
    ]
    alone = [pair for pair in matched if pair[0] not in joined]
    together = [pair for pair in matched if pair[0] in joined]
    p_list = [p[t] for t, _ in alone] + ([sum(p[t] for t, _ in together)] if together else [])
    q_list = [q[s] for _, s in alone] + ([sum(q[s] for _, s in together)] if together else [])
    p_matched = torch.stack(p_list).double()
    q_matched = torch.stack(q_list).double()
    p_hat, q_hat = p_matched / p_matched.sum(), q_matched / q_matched.sum()
    kl = float((p_hat * torch.log(p_hat / q_hat)).sum())
    teacher_taken = {t for t, _ in matched}
    student_taken = {s for _, s in matched}
    p_rest = torch.stack([p[i] for i in range(len(p)) if i not in teacher_taken])
    q_rest = torch.stack([q[i] for i in range(len(q)) if i not in student_taken])
    return kl + reference_uld(p_rest, q_rest)
