"""Distillation between a teacher and a student that tokenize differently, on aligned groups.

Each side gives its logits ``[B, T, V]``, its token ids ``[B, T]`` and the scored group of each
token ``[B, T]`` (:mod:`distill.data.cross_tokenizer`: groups ``0 .. G_b - 1`` per row, the same
numbers on both sides, ``-1`` elsewhere). A group spans the same bytes on both sides, and both
models have read exactly the bytes before it, so at the row before its first token both predict
the same thing: the next chunk of text.

**The group distribution.** For a group whose tokens on one side are ``x_1 .. x_n`` and whose
first token is predicted at row ``r_1`` (token ``x_i`` at row ``r_i``), with
``l_i = log softmax(z_{r_i} / T)``, the side's distribution over ``V + 1`` outcomes is::

    P(v)      = exp(l_1[v])                        v != x_1: the chunk starts with another token
    P(x_1)    = exp(l_1[x_1] + ... + l_n[x_n])      the chunk exactly as written (chain rule)
    P(bucket) = exp(l_1[x_1]) - P(x_1)             starts with x_1, then leaves the chunk

Nothing is renormalised: the mass the chain rule takes from ``x_1`` goes to the bucket, so both
sides' distributions sum to 1 exactly, their entries keep the model's own probabilities at
the row where both have read the same bytes, and a one-token group (``n = 1``, bucket 0) is the
plain next-token distribution. Renormalising over ``V`` instead would raise every alternative
of the side that needs more tokens for the chunk, a bias between tokenizers, not a property of
the text.

**Divergences** ``D`` between the teacher's ``p`` and the student's ``q`` of one group:

- ``uld``: the Universal Logit Distillation loss (Boizard et al. 2024): both vectors sorted in
  decreasing order, the shorter padded with zeros, ``sum_i |p_(i) - q_(i)|`` (in [0, 2]). It
  compares the shapes of the distributions, needs no map between vocabularies, is 0 for equal
  sorted vectors and does not change when either vocabulary is permuted. With ``top_k`` only
  the k largest entries are sorted and the rest of each side counts as one tail entry (a CPU
  sorts a ``[1000, 49152]`` batch in seconds; the top 256 in a fraction of a second).
- ``hybrid``: exact where the vocabularies agree, ULD where they do not. The *matched*
  outcomes are the chunk as written (``x_1`` of each side) and every pair of tokens with the
  same bytes (or special tokens of the same role) whose entries do not hold a chunk; the rest
  (and both buckets) are unmatched. ``D = KL(p_m || q_m) + ULD(p_u, q_u)``: ``p_m`` and ``q_m``
  are both sides' distributions renormalised over the matched outcomes, ``p_u`` and ``q_u``
  the unmatched entries as they are. The matched part is renormalised because the mass
  outside the intersection differs by construction: a teacher token the student spells in
  two pieces is no first-token outcome of the student, so a KL that compared that mass would
  ask the impossible (it is unbounded when the student has no unmatched outcome at all); the
  ULD of the unmatched entries carries their shape and size instead. With identical
  tokenizers every group is one token, every outcome is matched (matched mass 1, nothing to
  renormalise), the unmatched entries are 0 and ``hybrid`` equals forward KL on the full
  vocabulary.

**From a teacher cache** (:func:`sparse_group_parts`): the teacher's side is rebuilt from its
top-k at each row, the log-probability of each row's realised next token and ``c_T``
(:class:`~distill.losses.sparse.SparseTargets`). The chunk, ``x_1`` and the bucket are exact
(every token of a group is a realised token of the teacher's row); at the first row the top-k
and ``x_1`` are exact and the rest of the mass, the *tail* ``1 - sum`` of those, is shared
evenly by the other ids. All of it equals the live teacher's when the top-k covers the
vocabulary. Otherwise:

- ``uld`` with ``0 < top_k < k``: exact. Every id outside the cache's top-k is at most its k-th
  probability, live or rebuilt, so both sides' ``top_k`` largest entries are cached ones and
  the tails agree. With a full sort it differs from the live ULD by at most ``2 * tail`` per
  group (the rebuilt ``p`` is within ``2 * tail`` in L1, and a sorted L1 moves by at most that).
- ``hybrid``: the matched pairs outside the top-k count as one outcome in the KL (the teacher's
  even shares there against the sum of the student's probabilities): a coarser KL that sets no
  target for the shape of the tail (as the same-tokenizer cache's tail bucket); the ULD of the
  unmatched entries sees the even shares.

**The objective**, summed like every loss of distill::

    alpha * sum CE(student, its own labels) + (1 - alpha) * s * sum_groups D

with ``s = T^2`` when ``scale_by_t2``. The caller divides by the window's count of student
target tokens (the same normaliser as the cross-entropy), so a group counts once however many
tokens it spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from distill.losses.functional import IGNORE_INDEX, LossTerms
from distill.losses.sparse import SparseTargets

__all__ = [
    "CROSS_TOKENIZER_LOSSES",
    "CrossTokenizerKind",
    "GroupParts",
    "GroupRows",
    "cross_tokenizer_loss",
    "group_divergence",
    "group_parts",
    "group_rows",
    "hybrid_divergence",
    "merged_group_logprobs",
    "merged_logprobs",
    "sparse_group_parts",
    "teacher_group_parts",
    "uld",
]

CrossTokenizerKind = Literal["uld", "hybrid"]
CROSS_TOKENIZER_LOSSES = ("uld", "hybrid")


@dataclass(frozen=True)
class GroupRows:
    """Where one side's groups are predicted, as flat row indices into ``[B * T]``."""

    start_rows: torch.Tensor  # (G,) the row predicting each group's first token
    first_ids: torch.Tensor  # (G,) each group's first token
    later_rows: torch.Tensor  # (n,) the rows predicting the groups' other tokens
    later_ids: torch.Tensor  # (n,) those tokens
    later_groups: torch.Tensor  # (n,) their group (0 .. G - 1 over the whole batch)
    n_groups: int


def group_rows(input_ids: torch.Tensor, groups: torch.Tensor) -> GroupRows:
    """The rows of ``input_ids`` ``[B, T]`` that predict each token of a scored group
    (``groups`` ``[B, T]``, per row 0, 1, ... or -1); groups are numbered over the batch, row
    after row. A group's tokens are contiguous, and none starts at position 0."""
    batch, length = groups.shape
    per_row = (groups.max(dim=1).values + 1).clamp_min(0)  # (B,)
    offsets = torch.cumsum(per_row, 0) - per_row  # (B,)
    row, position = (groups >= 0).nonzero(as_tuple=True)  # (n_tokens,) each, row-major
    if bool((position == 0).any()):
        raise ValueError("a scored group starts at position 0: no row predicts it")
    group = offsets[row] + groups[row, position]
    predicting = row * length + position - 1  # flat index of the row before each token
    first = groups[row, position - 1] != groups[row, position]
    n_groups = int(per_row.sum())
    start_rows = torch.zeros(n_groups, dtype=torch.long, device=groups.device)
    first_ids = torch.zeros_like(start_rows)
    start_rows[group[first]] = predicting[first]
    first_ids[group[first]] = input_ids[row, position][first]
    later = ~first
    return GroupRows(
        start_rows,
        first_ids,
        predicting[later],
        input_ids[row, position][later],
        group[later],
        n_groups,
    )


@dataclass(frozen=True)
class GroupParts:
    """One side's group distributions in parts: the first-step log-probabilities ``[G, V]``
    (entry ``x_1`` not yet replaced), each group's first token, the chunk's chain-rule
    log-probability and the bucket's log-probability (``-inf`` for a one-token group); from a
    cache, which first-step entries are exact (the rest share the tail evenly)."""

    start: torch.Tensor  # (G, V) log softmax(z_{r_1} / T)
    first_ids: torch.Tensor  # (G,) x_1
    chunk: torch.Tensor  # (G,) l_1[x_1] + ... + l_n[x_n]
    bucket: torch.Tensor  # (G,) log(exp(l_1[x_1]) - exp(chunk))
    known: torch.Tensor | None = None  # (G, V) bool: exact entries of ``start`` (None: all)


def group_parts(logits: torch.Tensor, rows: GroupRows, temperature: float = 1.0) -> GroupParts:
    """:class:`GroupParts` of one side from its flat logits ``[B * T, V]``."""
    start = torch.log_softmax(logits[rows.start_rows].div_(temperature), dim=-1)  # (G, V)
    later_rows = logits[rows.later_rows].div_(temperature)  # (n, V)
    later = later_rows.gather(1, rows.later_ids[:, None]).squeeze(1) - torch.logsumexp(
        later_rows, dim=-1
    )  # (n,) log p of each later token
    first = start.gather(1, rows.first_ids[:, None]).squeeze(1)  # (G,)
    return _parts(start, rows, first, later)


def _parts(
    start: torch.Tensor, rows: GroupRows, first: torch.Tensor, later: torch.Tensor
) -> GroupParts:
    """:class:`GroupParts` from the first rows ``[G, V]``, ``log p(x_1)`` ``[G]`` and the later
    tokens' log-probabilities ``[n]``: the chunk by the chain rule, the bucket the rest of x_1."""
    rest = first.new_zeros(rows.n_groups).index_add(0, rows.later_groups, later)  # (G,)
    continues = rest < 0
    safe_rest = torch.where(continues, rest, torch.full_like(rest, -1.0))  # no log(0) gradient
    bucket = torch.where(
        continues, first + torch.log(-torch.expm1(safe_rest)), torch.full_like(rest, -torch.inf)
    )
    return GroupParts(start, rows.first_ids, first + rest, bucket)


def sparse_group_parts(
    targets: SparseTargets, rows: GroupRows, vocab: int, temperature: float = 1.0
) -> GroupParts:
    """:class:`GroupParts` of a cached teacher (module docstring) from its flat targets rows
    ``[B * T, k]`` with the realised tokens' log-probabilities ``[B * T]``, over ``vocab`` ids:
    the chunk, ``x_1`` and the bucket exact; at the first row the top-k and ``x_1`` exact and
    the rest of the mass spread evenly over the other ids. ``temperature`` must be stored."""
    realised = targets.realised_logprobs(temperature)  # (N,) log p_T of each row's next token
    first = realised[rows.start_rows]  # (G,) log p_T(x_1)
    top_ids = targets.ids[rows.start_rows]  # (G, k)
    top = targets.teacher_logprobs(temperature)[rows.start_rows]  # (G, k)
    first_in_top = top_ids == rows.first_ids[:, None]  # (G, k)
    known_mass = top.exp().masked_fill(first_in_top, 0.0).sum(-1) + first.exp()  # (G,)
    others = vocab - top_ids.shape[1] - (~first_in_top.any(-1)).to(top.dtype)  # (G,) ids left
    tiny = torch.finfo(top.dtype).tiny  # a finite log for an empty or rounded-away tail
    spread = (1.0 - known_mass).clamp_min(tiny).log() - others.clamp_min(1.0).log()  # (G,)
    start = spread[:, None].expand(-1, vocab).clone()  # (G, V)
    start.scatter_(1, top_ids, top)
    start.scatter_(1, rows.first_ids[:, None], first[:, None])
    known = torch.zeros_like(start, dtype=torch.bool).scatter_(1, top_ids, True)  # (G, V)
    known.scatter_(1, rows.first_ids[:, None], True)
    parts = _parts(start, rows, first, realised[rows.later_rows])
    return GroupParts(parts.start, parts.first_ids, parts.chunk, parts.bucket, known)


def merged_logprobs(parts: GroupParts) -> torch.Tensor:
    """Log of each group's distribution over ``V + 1`` outcomes ``[G, V + 1]`` from its parts:
    column ``x_1`` holds the chunk, the last column the bucket."""
    merged = parts.start.scatter(1, parts.first_ids[:, None], parts.chunk[:, None])  # (G, V)
    return torch.cat([merged, parts.bucket[:, None]], dim=1)  # (G, V + 1)


def merged_group_logprobs(
    logits: torch.Tensor, rows: GroupRows, temperature: float = 1.0
) -> torch.Tensor:
    """Log of each group's distribution over ``V + 1`` outcomes (module docstring), ``[G, V + 1]``:
    column ``x_1`` holds the chain-rule log-probability of the whole chunk, the last column the
    bucket (``-inf`` for a one-token group). ``logits`` are flat ``[B * T, V]``."""
    return merged_logprobs(group_parts(logits, rows, temperature))


def uld(
    teacher_probs: torch.Tensor, student_probs: torch.Tensor, top_k: int | None = None
) -> torch.Tensor:
    """Per row, ``sum_i |p_(i) - q_(i)|`` of the probabilities sorted in decreasing order, the
    shorter row padded with zeros: ``[G, A]`` and ``[G, B]`` -> ``[G]``.

    ``top_k``: only the ``k`` largest entries of each row are sorted and compared; the rest of
    each row counts as one tail entry, ``|tail_p - tail_q|`` (the tails' masses; a lower bound
    of their sorted L1). Exact when ``k`` covers both rows; None (or 0) sorts everything. A
    full sort of ``[1000, 49152]`` takes seconds on a CPU, a top-256 a fraction of that."""
    width = max(teacher_probs.shape[-1], student_probs.shape[-1])
    if top_k and top_k < width:
        p_top = torch.topk(teacher_probs, min(top_k, teacher_probs.shape[-1]), dim=-1).values
        q_top = torch.topk(student_probs, min(top_k, student_probs.shape[-1]), dim=-1).values
        p_tail = teacher_probs.sum(-1) - p_top.sum(-1)  # (G,)
        q_tail = student_probs.sum(-1) - q_top.sum(-1)
        p_top = F.pad(p_top, (0, top_k - p_top.shape[-1]))
        q_top = F.pad(q_top, (0, top_k - q_top.shape[-1]))
        return (p_top - q_top).abs().sum(-1) + (p_tail - q_tail).abs()
    p = torch.sort(teacher_probs, dim=-1, descending=True).values
    q = torch.sort(student_probs, dim=-1, descending=True).values
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


@dataclass(frozen=True)
class _PairIndex:
    """Where one vocabulary's ids sit among the pairs of equal tokens and among the rest."""

    pair_of: torch.Tensor  # (V,) index into the pairs, -1 for an unpaired id
    unpaired: torch.Tensor  # (V - M,) the unpaired ids
    unpaired_of: torch.Tensor  # (V,) index into ``unpaired``, -1 for a paired id

    @classmethod
    def build(cls, pair_ids: torch.Tensor, vocab: int) -> _PairIndex:
        pair_of = torch.full((vocab,), -1, dtype=torch.long, device=pair_ids.device)
        pair_of[pair_ids] = torch.arange(len(pair_ids), device=pair_ids.device)
        unpaired = (pair_of < 0).nonzero().flatten()
        unpaired_of = torch.full_like(pair_of, -1)
        unpaired_of[unpaired] = torch.arange(len(unpaired), device=pair_ids.device)
        return cls(pair_of, unpaired, unpaired_of)


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[g, index[g]]`` ``[G]``, 0 where ``index`` is -1."""
    picked = values.gather(1, index.clamp_min(0)[:, None]).squeeze(1)
    return torch.where(index >= 0, picked, torch.zeros_like(picked))


def _unmatched(
    parts: GroupParts, index: _PairIndex, partner_probs: torch.Tensor, partner_pair: torch.Tensor
) -> torch.Tensor:
    """One side's unmatched probabilities ``[G, V - M + 2]``: its unpaired ids (the first token,
    which holds the chunk, set to 0), its entry of the pair the other side's first token broke
    (``partner_pair``, -1 for none), and its bucket."""
    rest = parts.start.index_select(1, index.unpaired).exp()  # (G, V - M)
    if rest.shape[1]:
        position = index.unpaired_of[parts.first_ids]  # (G,) the first token among them, or -1
        at = position.clamp_min(0)[:, None]
        kept = rest.gather(1, at) * (position < 0).to(rest.dtype)[:, None]
        rest = rest.scatter(1, at, kept)
    broken = _at(partner_probs, partner_pair)  # (G,)
    return torch.cat([rest, broken[:, None], parts.bucket.exp()[:, None]], dim=1)


def _unknown_pairs_correction(
    known: torch.Tensor,
    teacher_pairs: torch.Tensor,
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """``[G]`` to add to the matched ``S`` of a cached teacher: its pairs outside the top-k
    (even shares of the tail, not the teacher's own probabilities) leave the sum and come
    back as one outcome, the teacher's mass there against the sum of the student's."""
    unknown = ~known.index_select(1, teacher_pairs) & (valid > 0)  # (G, M)
    spread = torch.where(unknown, log_p.exp() * (log_p - log_q), 0.0).sum(-1)  # (G,)
    some = unknown.any(-1, keepdim=True)  # (G, 1): rows without any stay finite (no NaN grad)
    outcome = [
        torch.logsumexp(torch.where(some, side.masked_fill(~unknown, -torch.inf), 0.0), dim=-1)
        for side in (log_p, log_q)
    ]  # log of the teacher's and the student's mass on the joined outcome, (G,) each
    joined = outcome[0].exp() * (outcome[0] - outcome[1])
    return torch.where(some.squeeze(1), joined - spread, 0.0)


def hybrid_divergence(
    teacher: GroupParts,
    student: GroupParts,
    teacher_pairs: torch.Tensor,
    student_pairs: torch.Tensor,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per group, KL over the matched outcomes (both renormalised over them) plus ULD over the
    unmatched outcomes (module docstring); ``[G]``. ``teacher_pairs`` and ``student_pairs``
    ``[M]`` are the vocabularies' pairs of equal tokens; ``top_k`` as in :func:`uld`.

    The matched sums run over every pair but the (at most two) a group's first tokens break,
    plus the chunk pair, so no ``[G, V]`` mask is built:
    ``KL(p_m || q_m) = S / P - log P + log Q`` with ``S = sum p (log p - log q)``, ``P = sum p``
    and ``Q = sum q`` over the matched outcomes."""
    teacher_index = _PairIndex.build(teacher_pairs, teacher.start.shape[1])
    student_index = _PairIndex.build(student_pairs, student.start.shape[1])
    log_p = teacher.start.index_select(1, teacher_pairs)  # (G, M)
    log_q = student.start.index_select(1, student_pairs)  # (G, M)
    p, q = log_p.exp(), log_q.exp()
    by_teacher = teacher_index.pair_of[teacher.first_ids]  # (G,) pair of x_1 (teacher), or -1
    by_student = student_index.pair_of[student.first_ids]
    second = torch.where(by_student != by_teacher, by_student, torch.full_like(by_student, -1))
    # (G, M): 0 at the pairs the first tokens break (no cancellation); a first token that
    # breaks none writes into an extra last column, dropped
    valid = torch.ones(p.shape[0], p.shape[1] + 1, dtype=p.dtype, device=p.device)
    for broken in (by_teacher, second):
        column = torch.where(broken >= 0, broken, torch.full_like(broken, p.shape[1]))
        valid.scatter_(1, column[:, None], 0.0)
    valid = valid[:, :-1]
    p_kept = p * valid
    p_chunk = teacher.chunk.exp()
    s_sum = (p_kept * (log_p - log_q)).sum(-1) + p_chunk * (teacher.chunk - student.chunk)
    if teacher.known is not None:  # a cache: the pairs outside its top-k as one outcome
        s_sum = s_sum + _unknown_pairs_correction(teacher.known, teacher_pairs, log_p, log_q, valid)
    p_sum = p_kept.sum(-1) + p_chunk
    q_sum = (q * valid).sum(-1) + student.chunk.exp()
    matched = s_sum / p_sum - p_sum.log() + q_sum.log()
    teacher_rest = _unmatched(teacher, teacher_index, p, second)
    student_partner = torch.where(
        by_teacher != by_student, by_teacher, torch.full_like(by_teacher, -1)
    )
    student_rest = _unmatched(student, student_index, q, student_partner)
    return matched + uld(teacher_rest, student_rest, top_k)


def teacher_group_parts(
    teacher: torch.Tensor | SparseTargets,
    rows: GroupRows,
    temperature: float,
    vocab: int | None = None,
) -> GroupParts:
    """The teacher's :class:`GroupParts`: from its logits ``[B, T, V]`` (live), or from cached
    :class:`SparseTargets` ``[B, T, k]`` with realised tokens over ``vocab`` ids."""
    if isinstance(teacher, SparseTargets):
        if vocab is None:
            raise ValueError("a cached teacher's group distributions need its vocabulary size")
        return sparse_group_parts(teacher.rows(), rows, vocab, temperature)
    return group_parts(teacher.reshape(-1, teacher.shape[-1]), rows, temperature)


def group_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTargets,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    student_groups: torch.Tensor,
    teacher_groups: torch.Tensor,
    *,
    kind: CrossTokenizerKind,
    temperature: float = 1.0,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    top_k: int | None = None,
    teacher_vocab: int | None = None,
) -> torch.Tensor:
    """``D`` of every scored group ``[G]`` (module docstring). Logits ``[B, T, V]`` of each
    side (the teacher's may be cached :class:`SparseTargets` ``[B, T, k]`` with realised
    tokens, over ``teacher_vocab`` ids), ids and groups ``[B, T]``; ``pairs`` (teacher ids,
    student ids) of equal tokens are needed by ``hybrid``; ``top_k``: the ULD compares the
    sorted top-k and the tails (:func:`uld`; None: exact)."""
    if kind not in CROSS_TOKENIZER_LOSSES:
        raise ValueError(f"kind must be one of {CROSS_TOKENIZER_LOSSES}, got {kind!r}")
    student_rows = group_rows(student_ids, student_groups)
    teacher_rows = group_rows(teacher_ids, teacher_groups)
    if student_rows.n_groups != teacher_rows.n_groups:
        raise ValueError(
            f"the student has {student_rows.n_groups} scored groups, the teacher "
            f"{teacher_rows.n_groups}: the groups must be aligned on the same rows"
        )
    student_flat = student_logits.reshape(-1, student_logits.shape[-1])  # (B * Ts, Vs)
    teacher = teacher_group_parts(teacher_logits, teacher_rows, temperature, teacher_vocab)
    student = group_parts(student_flat, student_rows, temperature)
    if kind == "uld":
        return uld(merged_logprobs(teacher).exp(), merged_logprobs(student).exp(), top_k)
    if pairs is None:
        raise ValueError("kind='hybrid' needs the vocabularies' pairs of equal tokens")
    teacher_pairs, student_pairs = (ids.to(student_logits.device) for ids in pairs)
    return hybrid_divergence(teacher, student, teacher_pairs, student_pairs, top_k)


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTargets | None,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    student_groups: torch.Tensor,
    teacher_groups: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kind: CrossTokenizerKind,
    temperature: float,
    alpha: float,
    scale_by_t2: bool = True,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    uld_top_k: int | None = None,
    teacher_vocab: int | None = None,
) -> LossTerms:
    """``alpha * CE + (1 - alpha) * s * sum_groups D``, summed (module docstring).

    ``student_logits`` ``[B, Ts, Vs]`` and ``labels`` ``[B, Ts]`` (the student's own next
    tokens, ``IGNORE_INDEX`` where none); the teacher's side may be None when ``alpha == 1``
    (labels only), or cached :class:`SparseTargets` with realised tokens over
    ``teacher_vocab`` ids. ``n_tokens`` counts the student's targets: the caller's normaliser;
    ``uld_top_k`` as ``top_k`` of :func:`uld`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    flat = student_logits.reshape(-1, student_logits.shape[-1])  # (B * Ts, Vs)
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    n_tokens = int(keep.sum())
    zero = flat.sum() * 0.0  # keeps every parameter in the graph
    ce_sum = F.cross_entropy(flat[keep], flat_labels[keep], reduction="sum") if n_tokens else zero
    divergence_sum = zero
    needs_teacher = alpha < 1.0 and teacher_logits is not None
    if needs_teacher and bool((student_groups >= 0).any()):
        if isinstance(teacher_logits, torch.Tensor):
            teacher_logits = teacher_logits.float()
        divergence_sum = group_divergence(
            student_logits.float(),
            teacher_logits,
            student_ids,
            teacher_ids,
            student_groups,
            teacher_groups,
            kind=kind,
            temperature=temperature,
            pairs=pairs,
            top_k=uld_top_k,
            teacher_vocab=teacher_vocab,
        ).sum()
    soft_weight = (1.0 - alpha) * (temperature**2 if scale_by_t2 else 1.0)
    loss_sum = alpha * ce_sum + soft_weight * divergence_sum
    return LossTerms(loss_sum, ce_sum.detach(), divergence_sum.detach(), n_tokens)
