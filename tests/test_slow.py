"""Tests on the real embedded teacher (SmolLM2-135M-Instruct). Run with `make test-slow`."""

from __future__ import annotations

import pytest
import torch

from distill.config import StudentConfig
from distill.models import default_teacher_path, load_causal_lm, load_tokenizer
from distill.student import build_student, select_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_teacher():
    return load_causal_lm(default_teacher_path())


def test_default_student_has_15_layers_copied_from_the_teacher(real_teacher):
    assert real_teacher.config.num_hidden_layers == 30
    layers = select_layers(30, StudentConfig())
    student = build_student(real_teacher, layers)
    assert student.config.num_hidden_layers == 15
    for new, old in enumerate(layers):
        for param, teacher_param in zip(
            student.model.layers[new].parameters(),
            real_teacher.model.layers[old].parameters(),
            strict=True,
        ):
            assert torch.equal(param, teacher_param)


def test_real_teacher_predicts_python_prose(real_teacher):
    """Sanity of the GGUF load: the teacher's perplexity on a Python sentence is low."""
    tokenizer = load_tokenizer(default_teacher_path())
    text = "The for statement is used to iterate over the elements of a sequence."
    input_ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        loss = real_teacher(input_ids, labels=input_ids).loss
    assert float(loss.exp()) < 100
