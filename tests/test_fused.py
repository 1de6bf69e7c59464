"""The fused chunked loss against the unfused path and the float64 reference, its memory bound,
bad inputs, and a training step of the spine fused vs unfused."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from references import reference_objective

from distill.config import LossConfig, TrainConfig
from distill.data import BlockBatches
from distill.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    auto_chunk_size,
    chunk_buffers,
    distillation_loss,
    fused_distillation_loss,
)
from distill.losses.objective import head_distillation_loss
from distill.losses.schedule import LossSettings, loss_settings
from distill.teacher import LiveTeacher
from distill.train import CausalLMTask, train
from distill.train.causal_lm import micro_batch_terms

NAMES = sorted(DIVERGENCES)
OPTIONS = {"temperature": 2.0, "alpha": 0.3, "beta": 0.3, "skew": 0.2}


def head_case(seed, rows, width, vocab, dtype=torch.float32, masked=(), bias=False):
    """Hidden ``[rows, width]``, head ``[vocab, width]`` (+ bias), teacher logits, labels."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=dtype) * scale

    hidden = normal(rows, width)
    weight = normal(vocab, width, scale=width**-0.5 * 3)
    head_bias = normal(vocab, scale=0.5) if bias else None
    teacher = normal(rows, vocab, scale=3.0)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[list(masked)] = IGNORE_INDEX
    return hidden, weight, head_bias, teacher, labels


def grads_of(fn, *tensors):
    """Run ``fn`` on fresh leaf copies; return its LossTerms and the copies' gradients."""
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    terms = fn(*leaves)
    (terms.loss_sum / terms.n_tokens).backward()
    return terms, [None if leaf is None else leaf.grad for leaf in leaves]


def unfused(hidden, weight, bias, teacher, labels, **options):
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (N, V)
    return distillation_loss(logits, teacher, labels, **options)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Frobenius-norm relative error (robust to individual near-zero entries)."""
    value, reference = value.detach(), reference.detach()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


# 37 rows: chunk sizes 3, 7, 16 do not divide it; with chunk 8, rows 8..23 are two whole masked
# chunks and rows 0..7 / 24..31 partly masked ones.
MASKED = [*range(8, 24), 2, 5, 30, 36]


@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 8, 16, 37, 100, 0])
def test_fused_equals_unfused_float32(divergence, chunk_size):
    """Loss, CE, divergence and the hidden / weight / bias gradients to relative error 1e-5."""
    hidden, weight, bias, teacher, labels = head_case(0, 37, 24, 300, masked=MASKED, bias=True)
    options = {**OPTIONS, "divergence": divergence}
    reference, reference_grads = grads_of(
        lambda h, w, b: unfused(h, w, b, teacher, labels, **options), hidden, weight, bias
    )
    fused, fused_grads = grads_of(
        lambda h, w, b: fused_distillation_loss(
            h, w, teacher, labels, bias=b, chunk_size=chunk_size, **options
        ),
        hidden,
        weight,
        bias,
    )
    assert fused.n_tokens == reference.n_tokens == 37 - len(MASKED)
    for name in ("loss_sum", "ce_sum", "divergence_sum"):
        assert relative_error(getattr(fused, name), getattr(reference, name)) <= 1e-5, name
    for name, got, want in zip(
        ("hidden", "weight", "bias"), fused_grads, reference_grads, strict=True
    ):
        assert relative_error(got, want) <= 1e-5, name
    assert torch.all(fused_grads[0][MASKED] == 0)


@pytest.mark.parametrize("divergence", NAMES)
def test_fused_masked_tokens_change_nothing(divergence):
    """Masked rows' hidden states and teacher logits (NaN here) leave the loss and the gradients
    unchanged; their hidden-state gradient is exactly 0."""
    hidden, weight, _, teacher, labels = head_case(1, 20, 8, 40, masked=[0, 3, 9, 10, 11, 19])
    masked = labels == IGNORE_INDEX
    options = {**OPTIONS, "divergence": divergence, "chunk_size": 4}
    clean, clean_grads = grads_of(
        lambda h, w: fused_distillation_loss(h, w, teacher, labels, **options), hidden, weight
    )
    dirty_hidden, dirty_teacher = hidden.clone(), teacher.clone()
    dirty_hidden[masked] = 50.0
    dirty_teacher[masked] = float("nan")
    dirty, dirty_grads = grads_of(
        lambda h, w: fused_distillation_loss(h, w, dirty_teacher, labels, **options),
        dirty_hidden,
        weight,
    )
    torch.testing.assert_close(dirty.loss_sum, clean.loss_sum, rtol=1e-6, atol=0)
    for got, want in zip(dirty_grads, clean_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert torch.all(dirty_grads[0][masked] == 0)


@settings(max_examples=40, deadline=None)
@given(
    divergence=st.sampled_from(NAMES),
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 12),
    vocab=st.integers(2, 30),
    chunk_size=st.integers(1, 13),
    temperature=st.floats(0.25, 8.0),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.01, 0.99),
    skew=st.floats(0.0, 0.95),
    scale_by_t2=st.booleans(),
    masked_share=st.floats(0.0, 0.9),
)
def test_fused_matches_reference_float64(
    divergence,
    seed,
    rows,
    vocab,
    chunk_size,
    temperature,
    alpha,
    beta,
    skew,
    scale_by_t2,
    masked_share,
):
    """The analytic chunked gradients against autograd through the plain reference."""
    generator = torch.Generator().manual_seed(seed)
    masked = [i for i in range(1, rows) if torch.rand((), generator=generator) < masked_share]
    hidden, weight, bias, teacher, labels = head_case(
        seed, rows, 6, vocab, torch.float64, masked, bias=seed % 2 == 0
    )
    options = dict(
        temperature=temperature,
        alpha=alpha,
        divergence=divergence,
        beta=beta,
        skew=skew,
        scale_by_t2=scale_by_t2,
    )
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    reference = reference_objective(torch.nn.functional.linear(*leaves), teacher, labels, **options)
    reference.backward()
    fused, fused_grads = grads_of(
        lambda h, w, b: fused_distillation_loss(
            h, w, teacher, labels, bias=b, chunk_size=chunk_size, **options
        ),
        hidden,
        weight,
        bias,
    )
    torch.testing.assert_close(fused.loss_sum / fused.n_tokens, reference, rtol=1e-10, atol=1e-12)
    for got, leaf in zip(fused_grads, leaves, strict=True):
        if leaf is not None:
            torch.testing.assert_close(got, leaf.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("divergence", NAMES)
def test_fused_gradcheck(divergence):
    """The fused backward against finite differences (float64, 5 rows x 4 wide x 7 vocab)."""
    hidden, weight, bias, teacher, labels = head_case(3, 5, 4, 7, torch.float64, [1], bias=True)
    inputs = tuple(t.clone().requires_grad_(True) for t in (hidden, weight, bias))

    def loss(h, w, b):
        return fused_distillation_loss(
            h,
            w,
            teacher,
            labels,
            bias=b,
            chunk_size=2,
            divergence=divergence,
            **OPTIONS,
        ).loss_sum

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


def test_teacher_hidden_equals_teacher_logits():
    """The teacher given as hidden states + projection (projected per chunk) == its logits."""
    hidden, weight, _, _, labels = head_case(4, 20, 8, 50, masked=[3, 4, 17])
    generator = torch.Generator().manual_seed(9)
    teacher_hidden = torch.randn(20, 12, generator=generator)
    teacher_weight = torch.randn(50, 12, generator=generator) * 0.5
    teacher_bias = torch.randn(50, generator=generator)
    teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias
    by_logits, grads_logits = grads_of(
        lambda h, w: fused_distillation_loss(h, w, teacher_logits, labels, chunk_size=6, **OPTIONS),
        hidden,
        weight,
    )
    by_hidden, grads_hidden = grads_of(
        lambda h, w: fused_distillation_loss(
            h,
            w,
            None,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            chunk_size=6,
            **OPTIONS,
        ),
        hidden,
        weight,
    )
    assert relative_error(by_hidden.loss_sum, by_logits.loss_sum) <= 1e-6
    for got, want in zip(grads_hidden, grads_logits, strict=True):
        assert relative_error(got, want) <= 1e-5


def test_no_grad_path_and_labels_only():
    hidden, weight, _, teacher, labels = head_case(5, 16, 8, 40, masked=[0, 9])
    with_grad = fused_distillation_loss(
        hidden.requires_grad_(True), weight, teacher, labels, chunk_size=5, **OPTIONS
    )
    with torch.no_grad():
        without = fused_distillation_loss(hidden, weight, teacher, labels, chunk_size=5, **OPTIONS)
    assert with_grad.loss_sum.requires_grad and not without.loss_sum.requires_grad
    torch.testing.assert_close(with_grad.loss_sum.detach(), without.loss_sum, rtol=1e-6, atol=0)
    labels_only = fused_distillation_loss(
        hidden.detach(), weight, None, labels, temperature=2.0, alpha=1.0
    )
    reference = unfused(hidden.detach(), weight, None, None, labels, temperature=2.0, alpha=1.0)
    assert relative_error(labels_only.loss_sum, reference.loss_sum) <= 1e-6
    assert float(labels_only.divergence_sum) == 0.0


def _peak_live_bytes(run) -> int:
    """The most CPU bytes that ``run()`` had allocated and not yet freed at any one moment.

    The profiler's allocation events (``alloc_size`` > 0 for an allocation, < 0 for a free)
    summed in the order they happened: the high-water mark of live bytes allocated inside
    ``run``, not the largest single allocation."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        run()
    events = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == torch._C._profiler._EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for _, size in sorted(events, key=lambda event: event[0]):
        live += size
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("rows", [512, 2048])
def test_peak_memory_stays_per_chunk(rows):
    """The peak of live bytes during the fused forward + backward stays within its budget:
    ``chunk_buffers`` ``[chunk, V]`` work buffers, the ``[V, H]`` weight gradient and the
    ``[N, H]`` hidden gradient (+ O(N) masks), at N = 512 and 2048 (3.5 and 12 x below one
    ``[N, V]`` float32 array). A loss that keeps each chunk's autograd graph (its ``[chunk, V]``
    logits and softmaxes) alive until backward peaks at several ``N x V`` and fails this; tried
    by swapping the fused function for chunked ``distillation_loss`` calls summed before one
    backward: peak 5.1e7 bytes at N = 2048 against a bound of 1.4e6."""
    width, vocab, chunk = 16, 2000, 32
    hidden, weight, _, teacher, labels = head_case(6, rows, width, vocab)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def step():
        terms = fused_distillation_loss(
            hidden, weight, teacher, labels, chunk_size=chunk, **OPTIONS
        )
        terms.loss_sum.backward()

    peak = _peak_live_bytes(step)
    work = chunk_buffers(OPTIONS.get("divergence", "forward_kl")) * chunk * vocab * 4
    gradients = (vocab * width + rows * width) * 4
    budget = work + gradients + rows * 32 + 65536  # + masks and indices, small tensors
    assert work < peak <= budget
    assert peak < rows * vocab * 4  # below one [N, V] float32 array


def test_chunk_sizes_follow_the_memory_budget():
    assert auto_chunk_size(49152, 512.0, chunk_buffers("forward_kl")) == 512 * 2**20 // (
        4 * 49152 * 4
    )
    assert chunk_buffers("jsd") == 5 and chunk_buffers("jsd", with_teacher=False) == 2
    assert auto_chunk_size(10, 0.001, 5) == 5 and auto_chunk_size(10**9, 1.0) == 1


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"weight": torch.zeros(30, 7)}, "hidden size"),
        ({"weight": torch.zeros(30, 8, dtype=torch.float64)}, "dtype"),
        ({"hidden": torch.zeros(12)}, "hidden"),
        ({"teacher_logits": torch.zeros(12, 29)}, "teacher_logits"),
        ({"bias": torch.zeros(29)}, "bias"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"memory_budget_mb": 0.0}, "memory_budget_mb"),
        ({"teacher_hidden": torch.zeros(12, 4)}, "teacher_hidden"),
        ({"teacher_logits": None, "teacher_hidden": torch.zeros(12, 4)}, "teacher_weight"),
        (
            {
                "teacher_logits": None,
                "teacher_hidden": torch.zeros(12, 4),
                "teacher_weight": torch.zeros(30, 5),
            },
            "teacher_weight",
        ),
        ({"labels": torch.full((12,), IGNORE_INDEX)}, "labels.*masked"),
        ({"labels": torch.zeros(11, dtype=torch.long)}, "labels"),
        (
            {
                "hidden": torch.zeros(0, 8),
                "teacher_logits": torch.zeros(0, 30),
                "labels": torch.zeros(0, dtype=torch.long),
            },
            "labels.*empty",
        ),
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 2.0}, "alpha"),
        ({"divergence": "jsd", "beta": 0.0}, "beta"),
    ],
)
def test_fused_bad_inputs_raise(change, word):
    hidden, weight, _, teacher, labels = head_case(2, 12, 8, 30)
    arguments = {
        "hidden": hidden,
        "weight": weight,
        "teacher_logits": teacher,
        "labels": labels,
        "temperature": 1.0,
        "alpha": 0.5,
        **change,
    }
    with pytest.raises(ValueError, match=word):
        fused_distillation_loss(**arguments)


def test_sparse_targets_refuse_other_divergences():
    from distill.losses.sparse import SparseTargets

    hidden, weight, _, _, labels = head_case(2, 4, 8, 30)
    targets = SparseTargets(
        torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2), torch.zeros(4, 1), (1.0,)
    )
    with pytest.raises(ValueError, match="divergence"):
        settings = LossSettings(temperature=1.0, alpha=0.5, divergence="skew_forward_kl")
        head_distillation_loss(hidden, weight, None, targets, labels, settings)


# --- the spine's loop, fused vs unfused --------------------------------------------------------


def _models(vocab: int = 64):
    teacher = LiveTeacher(make_llama(vocab, layers=2, seed=1))
    student = make_llama(vocab, layers=2, seed=2)
    blocks = torch.randint(0, vocab, (8, 12), generator=torch.Generator().manual_seed(3))
    return teacher, student, blocks


def test_micro_batch_gradients_fused_equal_unfused():
    """Every parameter's gradient of one micro-batch through the loop's ``micro_batch_terms``
    (student forward to the hidden states, fused head + loss) to relative error 1e-5."""
    teacher, student, blocks = _models()
    gradients = {}
    for fused in (False, True):
        model = copy.deepcopy(student).train()
        config = LossConfig(fused=fused, chunk_size=7, divergence="skew_reverse_kl")
        terms = micro_batch_terms(
            model, teacher, blocks[:4], loss_settings(config), teacher.vocab_rows
        )
        (terms.loss_sum / terms.n_tokens).backward()
        gradients[fused] = {name: p.grad for name, p in model.named_parameters()}
    for name, reference in gradients[False].items():
        assert relative_error(gradients[True][name], reference) <= 1e-5, name


@pytest.mark.parametrize(
    "loss_options",
    [
        {"divergence": "forward_kl"},
        {
            "divergence": "jsd",
            "beta": 0.3,
            "alpha_schedule": "linear",
            "alpha_end": 0.1,
            "temperature_schedule": "cosine",
            "temperature_end": 1.0,
        },
    ],
)
def test_training_steps_fused_equal_unfused(loss_options):
    """Same logged losses (rtol 1e-5) and the same weights after 3 AdamW steps of 2 x 2
    micro-batches through ``train()``. Weight tolerance: Adam's first steps move each weight by
    about lr * g / |g|, so a gradient entry at float32-noise level may move by a different
    amount of up to ~lr (1e-2) in either path: each weight must agree to lr / 100 = 1e-4, and
    each tensor's total update to a Frobenius relative error of 1e-3."""
    teacher, student, blocks = _models()
    trained = {}
    for fused in (False, True):
        model = copy.deepcopy(student)
        state = train(
            CausalLMTask(
                model,
                teacher,
                BlockBatches(blocks, 2, seed=0),
                LossConfig(fused=fused, chunk_size=7, **loss_options),
                vocab_rows=teacher.vocab_rows,
            ),
            TrainConfig(steps=3, batch_size=2, grad_accum=2, warmup_steps=0, lr=1e-2),
        )
        trained[fused] = (model, state.history)
    (model_a, history_a), (model_b, history_b) = trained[False], trained[True]
    for record_a, record_b in zip(history_a, history_b, strict=True):
        for key in ("loss", "ce", "divergence"):
            assert abs(record_a[key] - record_b[key]) <= 1e-5 * abs(record_a[key]), key
    before = dict(student.named_parameters())
    for (name, param_a), param_b in zip(
        model_a.named_parameters(), model_b.parameters(), strict=True
    ):
        torch.testing.assert_close(param_a, param_b, rtol=1e-5, atol=1e-4, msg=name)
        update_a = (param_a - before[name]).detach()
        update_b = (param_b - before[name]).detach()
        assert float(update_a.norm()) > 0, name
        assert relative_error(update_b, update_a) <= 1e-3, name


def test_micro_batch_terms_follow_the_schedule():
    """At the last step a linear temperature/alpha schedule gives the loss of the end values."""
    teacher, student, blocks = _models()
    scheduled = LossConfig(
        temperature=4.0,
        temperature_schedule="linear",
        temperature_end=1.5,
        alpha=0.9,
        alpha_schedule="cosine",
        alpha_end=0.2,
    )
    with torch.no_grad():
        last = micro_batch_terms(
            student, teacher, blocks[:2], loss_settings(scheduled, 4, 5), teacher.vocab_rows
        )
        first = micro_batch_terms(
            student, teacher, blocks[:2], loss_settings(scheduled, 0, 5), teacher.vocab_rows
        )
        end = micro_batch_terms(
            student,
            teacher,
            blocks[:2],
            loss_settings(LossConfig(temperature=1.5, alpha=0.2)),
            teacher.vocab_rows,
        )
        start = micro_batch_terms(
            student,
            teacher,
            blocks[:2],
            loss_settings(LossConfig(temperature=4.0, alpha=0.9)),
            teacher.vocab_rows,
        )
    torch.testing.assert_close(last.loss_sum, end.loss_sum)
    torch.testing.assert_close(first.loss_sum, start.loss_sum)
    assert not torch.isclose(first.loss_sum, last.loss_sum)
