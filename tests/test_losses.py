"""The seed loss against its float64 reference: values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import reference_distillation_loss

from distill.losses import IGNORE_INDEX, distillation_loss


def _random_case(seed: int, rows: int, vocab: int, masked_share: float):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    mask = torch.rand(rows, generator=generator) < masked_share
    mask[0] = False  # at least one target
    labels[mask] = IGNORE_INDEX
    return student, teacher, labels


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 12),
    vocab=st.integers(2, 40),
    temperature=st.floats(0.25, 8.0),
    alpha=st.floats(0.0, 1.0),
    masked_share=st.floats(0.0, 0.8),
)
def test_loss_and_gradients_match_reference(seed, rows, vocab, temperature, alpha, masked_share):
    """Mean loss and d loss / d student_logits agree with the reference to 1e-10 (float64)."""
    student, teacher, labels = _random_case(seed, rows, vocab, masked_share)
    student_fast = student.clone().requires_grad_(True)
    terms = distillation_loss(student_fast, teacher, labels, temperature=temperature, alpha=alpha)
    fast = terms.loss_sum / terms.n_tokens
    fast.backward()
    student_ref = student.clone().requires_grad_(True)
    reference = reference_distillation_loss(student_ref, teacher, labels, temperature, alpha)
    reference.backward()
    assert terms.n_tokens == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(student_fast.grad, student_ref.grad, rtol=1e-8, atol=1e-10)


def test_zero_kl_when_student_equals_teacher():
    student, _, labels = _random_case(1, 8, 16, 0.3)
    terms = distillation_loss(student, student.clone(), labels, temperature=2.0, alpha=0.0)
    assert abs(float(terms.kl_sum)) < 1e-12
    assert float(terms.loss_sum) == pytest.approx(0.0, abs=1e-12)


def test_masked_rows_change_nothing():
    student, teacher, labels = _random_case(2, 10, 16, 0.5)
    baseline = distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.5)
    scrambled_student = student.clone()
    scrambled_student[labels == IGNORE_INDEX] = 1e3
    changed = distillation_loss(scrambled_student, teacher, labels, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(baseline.loss_sum, changed.loss_sum)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"temperature": 0.0, "alpha": 0.5}, "temperature"),
        ({"temperature": 1.0, "alpha": 1.5}, "alpha"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, word):
    student, teacher, labels = _random_case(3, 4, 8, 0.0)
    with pytest.raises(ValueError, match=word):
        distillation_loss(student, teacher, labels, **kwargs)
