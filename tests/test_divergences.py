"""The divergence library (unfused path) against plain float64 references, its stated
properties, bad inputs, schedules and the loss config."""

from __future__ import annotations

import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import reference_divergence, reference_objective

from distill.config import LossConfig, load_config
from distill.errors import ConfigError
from distill.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    distillation_loss,
    forward_kl,
    jsd,
    reverse_kl,
    scheduled_value,
    skew_forward_kl,
    skew_reverse_kl,
    soft_divergence,
    total_variation,
)

NAMES = sorted(DIVERGENCES)


def random_case(seed: int, rows: int, vocab: int, masked_share: float, scale: float = 3.0):
    """Float64 student and teacher logits ``[rows, vocab]`` and labels with masked rows."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    mask = torch.rand(rows, generator=generator) < masked_share
    mask[0] = False  # at least one target
    labels[mask] = IGNORE_INDEX
    return student, teacher, labels


@settings(max_examples=60, deadline=None)
@given(
    divergence=st.sampled_from(NAMES),
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 10),
    vocab=st.integers(2, 40),
    temperature=st.floats(0.25, 8.0),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.01, 0.99),
    skew=st.floats(0.0, 0.95),
    scale_by_t2=st.booleans(),
    masked_share=st.floats(0.0, 0.8),
)
def test_every_divergence_matches_reference(
    divergence, seed, rows, vocab, temperature, alpha, beta, skew, scale_by_t2, masked_share
):
    """Mean loss to 1e-10 and d loss / d student_logits to 1e-8 relative (float64)."""
    student, teacher, labels = random_case(seed, rows, vocab, masked_share)
    options = dict(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        skew=skew,
        scale_by_t2=scale_by_t2,
    )
    fast_input = student.clone().requires_grad_(True)
    terms = distillation_loss(fast_input, teacher, labels, **options)
    fast = terms.loss_sum / terms.n_tokens
    fast.backward()
    reference_input = student.clone().requires_grad_(True)
    reference = reference_objective(reference_input, teacher, labels, **options)
    reference.backward()
    assert terms.n_tokens == int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_input.grad, reference_input.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("divergence", NAMES)
def test_gradcheck(divergence):
    """Autograd gradients of the unfused loss against finite differences (float64, 3 x 5)."""
    student, teacher, labels = random_case(7, 3, 5, 0.0, scale=1.0)
    student.requires_grad_(True)

    def loss(student_logits):
        return distillation_loss(
            student_logits,
            teacher,
            labels,
            temperature=1.5,
            alpha=0.3,
            divergence=divergence,
            beta=0.3,
            skew=0.2,
        ).loss_sum

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-7)


def test_public_functions_are_the_registry():
    """Each named function is ``soft_divergence`` with that name (one name per operation)."""
    student, teacher, _ = random_case(3, 6, 9, 0.0)
    functions = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "jsd": jsd,
        "skew_forward_kl": skew_forward_kl,
        "skew_reverse_kl": skew_reverse_kl,
        "tv": total_variation,
    }
    assert set(functions) == set(DIVERGENCES)
    p = torch.softmax(teacher / 2.0, -1)
    q = torch.softmax(student / 2.0, -1)
    for name, function in functions.items():
        value = function(student, teacher, temperature=2.0)
        torch.testing.assert_close(
            value, soft_divergence(student, teacher, divergence=name, temperature=2.0)
        )
        expected = sum(reference_divergence(p[i], q[i], name) for i in range(6))
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


# --- properties --------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_zero_when_student_equals_teacher(divergence, temperature):
    student, _, _ = random_case(1, 8, 16, 0.0)
    value = soft_divergence(
        student, student.clone(), divergence=divergence, temperature=temperature
    )
    assert abs(float(value)) < 1e-12


@settings(max_examples=40, deadline=None)
@given(
    divergence=st.sampled_from(NAMES),
    seed=st.integers(0, 10_000),
    temperature=st.floats(0.25, 8.0),
    beta=st.floats(0.01, 0.99),
    skew=st.floats(0.0, 0.95),
)
def test_nonnegative_and_tv_at_most_one(divergence, seed, temperature, beta, skew):
    """Every divergence is >= 0 per row (KL, JSD, skew KLs by Gibbs' inequality); TV <= 1."""
    student, teacher, _ = random_case(seed, 6, 12, 0.0, scale=5.0)
    for row in range(6):
        value = float(
            soft_divergence(
                student[row : row + 1],
                teacher[row : row + 1],
                divergence=divergence,
                temperature=temperature,
                beta=beta,
                skew=skew,
            )
        )
        assert value >= -1e-12
        if divergence == "tv":
            assert value <= 1.0 + 1e-12


def test_jsd_at_half_is_symmetric_and_others_are_not():
    student, teacher, _ = random_case(4, 8, 16, 0.0)
    forward = jsd(student, teacher, temperature=2.0, beta=0.5)
    swapped = jsd(teacher, student, temperature=2.0, beta=0.5)
    torch.testing.assert_close(forward, swapped, rtol=1e-12, atol=0)
    lopsided = jsd(student, teacher, temperature=2.0, beta=0.2)
    assert not torch.isclose(lopsided, jsd(teacher, student, temperature=2.0, beta=0.2))
    assert not torch.isclose(forward_kl(student, teacher), reverse_kl(student, teacher))


@pytest.mark.parametrize("small", [1e-4, 1e-6])
def test_jsd_beta_limits(small):
    """JSD_beta / beta -> KL(p || q) as beta -> 0; JSD_beta / (1 - beta) -> KL(q || p) as
    beta -> 1. The gap is O(beta) (the chi^2 term), so it shrinks with ``small``."""
    student, teacher, _ = random_case(5, 8, 16, 0.0, scale=1.0)
    options = {"temperature": 2.0}
    forward = forward_kl(student, teacher, **options)
    reverse = reverse_kl(student, teacher, **options)
    near_zero = jsd(student, teacher, beta=small, **options) / small
    near_one = jsd(student, teacher, beta=1.0 - small, **options) / small
    assert abs(float(near_zero / forward) - 1) < 20 * small
    assert abs(float(near_one / reverse) - 1) < 20 * small
    mid = jsd(student, teacher, beta=0.5, **options) / 0.5
    assert abs(float(mid / forward) - 1) > 100 * small  # the limit is not reached trivially


def test_skew_zero_is_the_plain_kl():
    student, teacher, _ = random_case(6, 8, 16, 0.0)
    torch.testing.assert_close(
        skew_forward_kl(student, teacher, skew=0.0),
        forward_kl(student, teacher),
        rtol=1e-12,
        atol=0,
    )
    torch.testing.assert_close(
        skew_reverse_kl(student, teacher, skew=0.0),
        reverse_kl(student, teacher),
        rtol=1e-12,
        atol=0,
    )
    assert skew_forward_kl(student, teacher, skew=0.5) < forward_kl(student, teacher)


@pytest.mark.parametrize("divergence", NAMES)
def test_masked_tokens_change_nothing(divergence):
    """Masked rows may hold anything (even NaN): loss and unmasked gradients are unchanged."""
    student, teacher, labels = random_case(2, 10, 16, 0.5)
    masked = labels == IGNORE_INDEX
    assert masked.any()
    options = dict(temperature=2.0, alpha=0.5, divergence=divergence)
    clean = student.clone().requires_grad_(True)
    baseline = distillation_loss(clean, teacher, labels, **options)
    baseline.loss_sum.backward()
    dirty_student, dirty_teacher = student.clone(), teacher.clone()
    dirty_student[masked] = float("nan")
    dirty_teacher[masked] = 1e4
    dirty = dirty_student.requires_grad_(True)
    changed = distillation_loss(dirty, dirty_teacher, labels, **options)
    changed.loss_sum.backward()
    torch.testing.assert_close(baseline.loss_sum, changed.loss_sum, rtol=0, atol=0)
    torch.testing.assert_close(clean.grad, dirty.grad, rtol=0, atol=0)
    assert torch.all(dirty.grad[masked] == 0)


@pytest.mark.parametrize("divergence", NAMES)
def test_t2_scale_is_switchable(divergence):
    student, teacher, labels = random_case(8, 6, 10, 0.2)
    options = dict(temperature=3.0, alpha=0.25, divergence=divergence)
    scaled = distillation_loss(student, teacher, labels, **options)
    plain = distillation_loss(student, teacher, labels, scale_by_t2=False, **options)
    torch.testing.assert_close(scaled.divergence_sum, plain.divergence_sum)
    torch.testing.assert_close(
        scaled.loss_sum - 0.25 * scaled.ce_sum, 9.0 * (plain.loss_sum - 0.25 * plain.ce_sum)
    )
    assert scaled.kl_sum is scaled.divergence_sum  # the seed's name still works


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "word"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"divergence": "jsd", "beta": 0.0}, "beta"),
        ({"divergence": "jsd", "beta": 1.0}, "beta"),
        ({"divergence": "skew_forward_kl", "skew": 1.0}, "skew"),
        ({"divergence": "skew_reverse_kl", "skew": -0.1}, "skew"),
        ({"divergence": "kl"}, "divergence"),
    ],
)
def test_bad_hyperparameters_raise(overrides, word):
    student, teacher, labels = random_case(3, 4, 8, 0.0)
    options = {"temperature": 1.0, "alpha": 0.5, **overrides}
    with pytest.raises(ValueError, match=word):
        distillation_loss(student, teacher, labels, **options)


def test_bad_tensors_raise():
    student, teacher, labels = random_case(3, 4, 8, 0.0)
    options = {"temperature": 1.0, "alpha": 0.5}
    with pytest.raises(ValueError, match="teacher_logits"):
        distillation_loss(student, teacher[:, :7], labels, **options)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(student, teacher, labels[:3], **options)
    with pytest.raises(ValueError, match="labels.*empty"):
        distillation_loss(student[:0], teacher[:0], labels[:0], **options)
    with pytest.raises(ValueError, match="labels.*masked"):
        distillation_loss(student, teacher, torch.full_like(labels, IGNORE_INDEX), **options)
    with pytest.raises(ValueError, match="labels must lie"):
        distillation_loss(student, teacher, torch.full_like(labels, 8), **options)


# --- schedules and config ----------------------------------------------------------------------


def test_schedules():
    assert scheduled_value("constant", 2.0, 5.0, 3, 10) == 2.0
    assert scheduled_value("linear", 2.0, None, 3, 10) == 2.0
    for kind in ("linear", "cosine"):
        assert scheduled_value(kind, 4.0, 1.0, 0, 7) == pytest.approx(4.0, abs=1e-12)
        assert scheduled_value(kind, 4.0, 1.0, 6, 7) == pytest.approx(1.0, abs=1e-12)
        assert scheduled_value(kind, 4.0, 1.0, 3, 7) == pytest.approx(2.5, abs=1e-12)
    assert scheduled_value("linear", 0.0, 1.0, 1, 5) == pytest.approx(0.25)
    assert scheduled_value("cosine", 0.0, 1.0, 1, 5) == pytest.approx((1 - 2**-0.5) / 2)
    assert scheduled_value("cosine", 1.0, 0.0, 0, 1) == 1.0
    with pytest.raises(ValueError, match="step"):
        scheduled_value("linear", 1.0, 0.0, 5, 5)
    with pytest.raises(ValueError, match="kind"):
        scheduled_value("exponential", 1.0, 0.0, 1, 5)


def test_loss_config_fields():
    config = load_config(overrides=["loss.divergence=jsd", "loss.beta=0.3"])
    assert config.loss.divergence == "jsd" and config.loss.fused and config.loss.scale_by_t2
    names = typing.get_args(LossConfig.model_fields["divergence"].annotation)
    assert set(names) == set(DIVERGENCES)
    for bad, key in [
        ("loss.divergence=kl", "loss.divergence"),
        ("loss.beta=1.0", "loss.beta"),
        ("loss.skew=1.0", "loss.skew"),
        ("loss.chunk_size=-1", "loss.chunk_size"),
        ("loss.memory_budget_mb=0", "loss.memory_budget_mb"),
        ("loss.temperature_end=0", "loss.temperature_end"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[bad])
    with pytest.raises(ConfigError, match="loss.temperature_schedule needs loss.temperature_end"):
        load_config(overrides=["loss.temperature_schedule=cosine"])
    with pytest.raises(ConfigError, match="loss.alpha_schedule needs loss.alpha_end"):
        load_config(overrides=["loss.alpha_schedule=linear"])
