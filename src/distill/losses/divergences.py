"""Divergences between the teacher's and the student's softened next-token distributions.

Every divergence here works on rows of log-probabilities, ``logq = log_softmax(student / T)``
and ``logp = log_softmax(teacher / T)``, both ``[n, V]``, and has two forms:

- ``value(logq, logp, param) -> [n]``: the per-row divergence in plain differentiable torch
  (the unfused loss takes its gradient by autograd);
- ``value_and_grad(logq, logp, param, spare) -> ([n], [n, V])``: the same values plus the
  analytic gradient with respect to the student's *tempered* logits ``z = student / T``. The
  fused loss calls it chunk by chunk. To touch no fresh memory it overwrites ``logq`` and
  ``logp`` and uses the ``Divergence.spares`` buffers in ``spare`` (each ``[n, V]``, contents
  ignored); the gradient it returns lives in one of those buffers.

With ``q = softmax(z)`` every gradient is ``d value / dz = q * (u - <q, u>)`` for some ``u``
(the softmax Jacobian applied to ``d value / dq``); each section's comment names its ``u``.
Teacher and student log-probabilities must be finite (no ``-inf`` columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Divergence", "DIVERGENCES"]

Rows = torch.Tensor  # (n, V)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _dot(a: Rows, b: Rows, scratch: Rows) -> torch.Tensor:
    """Per-row inner product ``[n]``, the products written to ``scratch`` (may alias a or b)."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _center_(u: Rows, q: Rows, scratch: Rows) -> Rows:
    """In place: ``u <- q * (u - <q, u>)``, the softmax Jacobian-vector product."""
    return u.sub_(_dot(q, u, scratch).unsqueeze(1)).mul_(q)


def _log_mix(loga: Rows, logb: Rows, weight: float) -> Rows:
    """``log(weight * exp(loga) + (1 - weight) * exp(logb))``, stable for tiny probabilities."""
    return torch.logaddexp(loga + _log(weight), logb + _log(1.0 - weight))


def _log_mix_into(loga: Rows, logb: Rows, weight: float, out: Rows, scratch: Rows) -> Rows:
    """:func:`_log_mix` written to ``out``, using ``scratch`` (neither may alias the inputs)."""
    torch.add(loga, _log(weight), out=out)
    torch.add(logb, _log(1.0 - weight), out=scratch)
    return torch.logaddexp(out, scratch, out=out)


# --- forward KL(p || q) = sum p (log p - log q); d/dz = q - p ------------------------------------


def _forward_kl(logq: Rows, logp: Rows, param: float) -> torch.Tensor:
    return (logp.exp() * (logp - logq)).sum(-1)


def _forward_kl_grad(logq, logp, param, spare):
    p = torch.exp(logp, out=spare[0])
    values = logp.sub_(logq).mul_(p).sum(-1)
    return values, logq.exp_().sub_(p)


# --- reverse KL(q || p) = sum q (log q - log p); u = log q - log p ------------------------------


def _reverse_kl(logq: Rows, logp: Rows, param: float) -> torch.Tensor:
    return (logq.exp() * (logq - logp)).sum(-1)


def _reverse_kl_grad(logq, logp, param, spare):
    u = torch.sub(logq, logp, out=logp)
    q = logq.exp_()
    values = _dot(q, u, spare[0])
    return values, u.sub_(values.unsqueeze(1)).mul_(q)


# --- generalized JSD (GKD): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q ---
# u = (1 - beta) (log q - log m): the terms through m cancel because sum_i (beta p_i + (1 - beta)
# q_i) / m_i * dq_i = sum_i dq_i = 0.


def _jsd(logq: Rows, logp: Rows, beta: float) -> torch.Tensor:
    logm = _log_mix(logp, logq, beta)
    teacher_side = (logp.exp() * (logp - logm)).sum(-1)
    student_side = (logq.exp() * (logq - logm)).sum(-1)
    return beta * teacher_side + (1.0 - beta) * student_side


def _jsd_grad(logq, logp, beta, spare):
    logm = _log_mix_into(logp, logq, beta, spare[0], spare[1])
    p = torch.exp(logp, out=spare[1])
    teacher_side = logp.sub_(logm).mul_(p).sum(-1)
    u = torch.sub(logq, logm, out=logm)  # log q - log m
    q = logq.exp_()
    student_side = _dot(q, u, logp)
    values = beta * teacher_side + (1.0 - beta) * student_side
    return values, u.sub_(student_side.unsqueeze(1)).mul_(q).mul_(1.0 - beta)


# --- skew forward KL (DistiLLM): KL(p || skew p + (1 - skew) q); u = -(1 - skew) p / m ----------


def _skew_forward_kl(logq: Rows, logp: Rows, skew: float) -> torch.Tensor:
    logm = _log_mix(logp, logq, skew)
    return (logp.exp() * (logp - logm)).sum(-1)


def _skew_forward_kl_grad(logq, logp, skew, spare):
    logm = _log_mix_into(logp, logq, skew, spare[0], spare[1])
    p = torch.exp(logp, out=spare[1])
    log_ratio = logp.sub_(logm)  # log(p / m)
    values = _dot(p, log_ratio, logm)
    u = log_ratio.exp_().mul_(-(1.0 - skew))
    return values, _center_(u, logq.exp_(), spare[0])


# --- skew reverse KL (DistiLLM): KL(q || skew q + (1 - skew) p); u = g - skew exp(g), g = log q/m


def _skew_reverse_kl(logq: Rows, logp: Rows, skew: float) -> torch.Tensor:
    logm = _log_mix(logq, logp, skew)
    return (logq.exp() * (logq - logm)).sum(-1)


def _skew_reverse_kl_grad(logq, logp, skew, spare):
    logm = _log_mix_into(logq, logp, skew, spare[0], spare[1])
    g = torch.sub(logq, logm, out=logm)  # log(q / m)
    q = logq.exp_()
    values = _dot(q, g, logp)
    u = g.sub_(torch.exp(g, out=logp).mul_(skew))
    return values, _center_(u, q, logp)


# --- total variation: 1/2 sum |q - p|; u = sign(q - p) / 2 (subgradient 0 where q == p) ---------


def _tv(logq: Rows, logp: Rows, param: float) -> torch.Tensor:
    return 0.5 * (logq.exp() - logp.exp()).abs().sum(-1)


def _tv_grad(logq, logp, param, spare):
    q = logq.exp_()
    diff = torch.sub(q, logp.exp_(), out=logp)  # q - p
    values = 0.5 * torch.abs(diff, out=spare[0]).sum(-1)
    return values, _center_(diff.sign_().mul_(0.5), q, spare[0])


ValueFn = Callable[[Rows, Rows, float], torch.Tensor]
GradFn = Callable[[Rows, Rows, float, list], tuple[torch.Tensor, Rows]]


@dataclass(frozen=True)
class Divergence:
    """One divergence: its name, what its parameter is, and its two forms (module docstring)."""

    name: str
    param: str | None  # "beta", "skew" or None
    value: ValueFn
    value_and_grad: GradFn
    spares: int  # scratch buffers [n, V] that value_and_grad needs

    def spare_buffers(self, like: Rows) -> list[Rows]:
        """Fresh scratch buffers for one ``value_and_grad`` call on rows shaped like ``like``."""
        return [torch.empty_like(like) for _ in range(self.spares)]


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence("forward_kl", None, _forward_kl, _forward_kl_grad, 1),
        Divergence("reverse_kl", None, _reverse_kl, _reverse_kl_grad, 1),
        Divergence("jsd", "beta", _jsd, _jsd_grad, 2),
        Divergence("skew_forward_kl", "skew", _skew_forward_kl, _skew_forward_kl_grad, 2),
        Divergence("skew_reverse_kl", "skew", _skew_reverse_kl, _skew_reverse_kl_grad, 2),
        Divergence("tv", None, _tv, _tv_grad, 1),
    )
}
