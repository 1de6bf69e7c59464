"""The fused distillation loss: the student's output projection, the loss and its gradients,
chunk by chunk over tokens, so the student's ``[N, V]`` logits never exist.

Inputs are the student's final hidden states ``[N, H]`` and output projection ``[V, H]`` (plus
bias), and the teacher's logits ``[N, V]`` (or its hidden states and projection, projected one
chunk at a time too). For each chunk of ``c`` rows the forward pass computes the student logits
with one matmul, the softmaxes once, the loss terms (same math as :mod:`.divergences`) and the
analytic ``d loss / d logits``, then turns it into ``grad_hidden = dlogits @ W`` and
``grad_W += dlogits^T @ hidden``. The loss is a scalar at the end of the graph, so backward only
multiplies the saved gradients by the incoming scalar. Extra memory: :func:`chunk_buffers`
buffers of ``[c, V]``, allocated once per call (the chunk size comes from ``memory_budget_mb``
unless given), plus one ``[V, H]`` and one ``[N, H]`` gradient: independent of ``N`` except
for the latter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.losses.divergences import DIVERGENCES
from distill.losses.functional import IGNORE_INDEX, LossSpec, LossTerms, kept_rows

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "auto_chunk_size",
    "chunk_buffers",
    "fused_distillation_loss",
]

DEFAULT_MEMORY_BUDGET_MB = 512.0


def chunk_buffers(divergence: str, with_teacher: bool = True) -> int:
    """``[c, V]`` buffers the fused loss holds: student logits, CE gradient, teacher logits and
    the divergence's scratch buffers (labels only: the first two)."""
    return 3 + DIVERGENCES[divergence].spares if with_teacher else 2


def auto_chunk_size(
    vocab: int, memory_budget_mb: float, buffers: int = 4, element_size: int = 4
) -> int:
    """Rows per chunk so that ``buffers`` buffers of ``[c, V]`` fit in ``memory_budget_mb``."""
    if vocab <= 0:
        raise ValueError(f"vocab must be > 0, got {vocab}")
    if not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    return max(1, int(memory_budget_mb * 2**20 // (buffers * vocab * element_size)))


@dataclass(frozen=True)
class _Plan:
    """Everything the chunk loop needs besides the differentiable tensors."""

    labels: torch.Tensor  # (N,)
    keep: torch.Tensor  # (N,) bool
    spec: LossSpec
    chunk_size: int
    teacher_logits: torch.Tensor | None  # (N, V)
    teacher_hidden: torch.Tensor | None  # (N, Ht)
    teacher_weight: torch.Tensor | None  # (V, Ht)
    teacher_bias: torch.Tensor | None  # (V,)

    @property
    def has_teacher(self) -> bool:
        return self.teacher_logits is not None or self.teacher_hidden is not None

    def teacher_rows(self, rows: slice, out: torch.Tensor) -> None:
        """Write the teacher's logits / T of the chunk's rows into ``out`` ``[c, V]``."""
        temperature = self.spec.temperature
        if self.teacher_logits is not None:
            torch.div(self.teacher_logits[rows], temperature, out=out)
            return
        _project(self.teacher_hidden[rows], self.teacher_weight, self.teacher_bias, out)
        out.div_(temperature)


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    """``out <- hidden @ weight^T (+ bias)``: ``[c, H] x [V, H] -> [c, V]``."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _chunk_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    plan: _Plan,
    rows: slice,
    work: list[torch.Tensor],
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CE sum, divergence sum and ``d loss / d logits`` ``[c, V]`` (or None) of one chunk.

    Masked rows are computed along (gathering the kept rows costs more than computing them) and
    then dropped: their values are left out of the sums and their ``dlogits`` rows zeroed.
    """
    spec, size = plan.spec, hidden.shape[0]
    keep = plan.keep[rows]  # (c,)
    partial = not bool(keep.all())
    labels = plan.labels[rows].masked_fill(~keep, 0) if partial else plan.labels[rows]
    logits = _project(hidden, weight, bias, work[0][:size])  # (c, V)
    logprobs = torch.log_softmax(logits, -1, out=work[1][:size])  # T = 1, for the hard CE
    ce = -_kept_sum(logprobs.gather(1, labels.unsqueeze(1)).squeeze(1), keep, partial)
    dlogits = None
    if want_grad and spec.alpha > 0:  # alpha * (softmax(s) - onehot(label))
        dlogits = logprobs.exp_().mul_(spec.alpha)
        dlogits[torch.arange(size), labels] -= spec.alpha
    divergence = logits.new_zeros(())
    if spec.alpha < 1.0 and plan.has_teacher:
        temperature = spec.temperature
        logq = torch.log_softmax(logits.div_(temperature), -1, out=logits)  # in place
        teacher = work[2][:size]
        plan.teacher_rows(rows, teacher)  # teacher logits / T
        logp = torch.log_softmax(teacher, -1, out=teacher)
        method = DIVERGENCES[spec.divergence]
        if want_grad:
            spare = [buffer[:size] for buffer in work[3:]]
            values, grad_z = method.value_and_grad(logq, logp, spec.param, spare)
            scale = spec.soft_weight / temperature  # dz/ds = 1 / T
            dlogits = grad_z.mul_(scale) if dlogits is None else dlogits.add_(grad_z, alpha=scale)
        else:
            values = method.value(logq, logp, spec.param)
        divergence = _kept_sum(values, keep, partial)
    if dlogits is not None and partial:
        dlogits.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)  # touches masked rows only
    return ce, divergence, dlogits


def _kept_sum(values: torch.Tensor, keep: torch.Tensor, partial: bool) -> torch.Tensor:
    """Sum of the kept rows' values ``[c]`` (masked rows may hold anything, even NaN)."""
    return torch.where(keep, values, 0.0).sum() if partial else values.sum()


def _run(hidden, weight, bias, plan: _Plan, want: tuple[bool, bool, bool]):
    """The chunk loop: summed CE and divergence, and the requested gradients (else None)."""
    rows_total, vocab = hidden.shape[0], weight.shape[0]
    chunk = min(plan.chunk_size, rows_total)
    buffers = chunk_buffers(plan.spec.divergence, plan.has_teacher and plan.spec.alpha < 1)
    work = [hidden.new_empty(chunk, vocab) for _ in range(buffers)]
    grad_hidden = torch.zeros_like(hidden) if want[0] else None
    grad_weight = torch.zeros_like(weight) if want[1] else None
    grad_bias = torch.zeros_like(bias) if want[2] else None
    ce_total = hidden.new_zeros((), dtype=torch.float64)
    divergence_total = hidden.new_zeros((), dtype=torch.float64)
    for start in range(0, rows_total, chunk):
        rows = slice(start, min(start + chunk, rows_total))
        if not bool(plan.keep[rows].any()):
            continue
        hidden_rows = hidden[rows]  # (c, H)
        ce, divergence, dlogits = _chunk_terms(
            hidden_rows, weight, bias, plan, rows, work, any(want)
        )
        ce_total += ce
        divergence_total += divergence
        if dlogits is None:
            continue
        if grad_hidden is not None:
            torch.mm(dlogits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(dlogits.t(), hidden_rows)  # (V, c) x (c, H)
        if grad_bias is not None:
            grad_bias.add_(dlogits.sum(0))
    grads = (grad_hidden, grad_weight, grad_bias)
    return ce_total.to(hidden.dtype), divergence_total.to(hidden.dtype), grads


class _FusedDistillation(torch.autograd.Function):
    """Forward computes the loss and saves its gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan, want: tuple[bool, bool, bool]):
        ce, divergence, grads = _run(hidden, weight, bias, plan, want)
        loss = plan.spec.alpha * ce + plan.spec.soft_weight * divergence
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, divergence)
        return loss, ce, divergence

    @staticmethod
    def backward(ctx, grad_loss, grad_ce, grad_divergence):
        scale_needed = bool(grad_loss != 1)
        grads = [
            None if g is None else (g * grad_loss if scale_needed else g) for g in ctx.saved_tensors
        ]
        return *grads, None, None


def _check_shapes(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    rows, width = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != width:
        raise ValueError(f"weight has hidden size {weight.shape[1]}, hidden has {width}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if teacher_logits is not None and teacher_hidden is not None:
        raise ValueError("teacher_hidden: give teacher_logits or teacher_hidden, not both")
    if teacher_logits is not None and tuple(teacher_logits.shape) != (rows, vocab):
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != (N, V) = {(rows, vocab)}"
        )
    if teacher_hidden is not None:
        if teacher_weight is None or teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != rows:
            raise ValueError(
                "teacher_hidden must be [N, Ht] with N as in hidden, and needs teacher_weight"
            )
        if tuple(teacher_weight.shape) != (vocab, teacher_hidden.shape[1]):
            raise ValueError(
                f"teacher_weight shape {tuple(teacher_weight.shape)} != (V, Ht) = "
                f"{(vocab, teacher_hidden.shape[1])}"
            )


def fused_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    scale_by_t2: bool = True,
    chunk_size: int = 0,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> LossTerms:
    """:func:`~distill.losses.distillation_loss` of the logits ``hidden @ weight^T + bias``,
    without building them; same arguments, same :class:`LossTerms` (sums, unmasked count).

    Shapes: ``hidden`` ``[N, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]``, ``labels`` ``[N]``,
    ``teacher_logits`` ``[N, V]`` or else ``teacher_hidden`` ``[N, Ht]`` with ``teacher_weight``
    ``[V, Ht]`` (and ``teacher_bias``). ``chunk_size`` rows per chunk; 0 = as many as fit in
    ``memory_budget_mb`` (see :func:`auto_chunk_size`). Gradients flow to ``hidden``, ``weight``
    and ``bias``; the teacher inputs are treated as constants.
    """
    spec = LossSpec(temperature, alpha, divergence, beta, skew, scale_by_t2)
    _check_shapes(hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight)
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
    rows, vocab = hidden.shape[0], weight.shape[0]
    keep = kept_rows(labels, rows, vocab, ignore_index)
    has_teacher = teacher_logits is not None or teacher_hidden is not None
    buffers = chunk_buffers(divergence, has_teacher and alpha < 1)
    chunk = chunk_size or auto_chunk_size(vocab, memory_budget_mb, buffers, hidden.element_size())
    plan = _Plan(
        labels, keep, spec, chunk, teacher_logits, teacher_hidden, teacher_weight, teacher_bias
    )
    grad_on = torch.is_grad_enabled()
    want = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if any(want):
        loss, ce, divergence_sum = _FusedDistillation.apply(hidden, weight, bias, plan, want)
    else:
        ce, divergence_sum, _ = _run(hidden, weight, bias, plan, want)
        loss = spec.alpha * ce + spec.soft_weight * divergence_sum
    return LossTerms(loss, ce, divergence_sum, int(keep.sum()))
