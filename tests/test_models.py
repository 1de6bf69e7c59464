"""Student construction by layer selection, and tokenizer / vocabulary compatibility."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_llama, make_tokenizer

from distill.config import StudentConfig
from distill.errors import ModelError
from distill.models import shared_vocab_rows
from distill.student import build_student, select_layers
from distill.train import student_logits


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (StudentConfig(), [0, 1, 2, 3, 4, 5, 6, 7, 23, 24, 25, 26, 27, 28, 29]),
        (StudentConfig(every_k=2), list(range(0, 30, 2))),
        (StudentConfig(layers=[-1, 0, 5]), [0, 5, 29]),
    ],
)
def test_select_layers(config, expected):
    assert select_layers(30, config) == expected


@pytest.mark.parametrize(
    "config",
    [
        StudentConfig(layers=[0, 30]),
        StudentConfig.model_construct(layers=[1, 1]),  # the schema refuses it first
        StudentConfig(keep_first=20, keep_last=20),
    ],
)
def test_select_layers_rejects_bad_recipes(config):
    with pytest.raises(ModelError, match="student"):
        select_layers(30, config)


def test_built_student_copies_kept_layers_exactly():
    teacher = make_llama(64, layers=6, seed=4)
    student = build_student(teacher, [0, 2, 5])
    assert student.config.num_hidden_layers == 3
    assert teacher.config.num_hidden_layers == 6
    for new, old in enumerate([0, 2, 5]):
        for (name, param), teacher_param in zip(
            student.model.layers[new].named_parameters(),
            teacher.model.layers[old].parameters(),
            strict=True,
        ):
            assert torch.equal(param, teacher_param), name
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert (
        student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    )


def test_student_with_all_layers_equals_teacher():
    teacher = make_llama(64, layers=3, seed=5)
    student = build_student(teacher, [0, 1, 2]).eval()
    input_ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            student(input_ids).logits, teacher(input_ids).logits, rtol=0, atol=0
        )


def test_padded_vocabularies_share_rows(caplog, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    with caplog.at_level(logging.WARNING):
        shared = shared_vocab_rows(tiny_tokenizer, tiny_tokenizer, vocab + 64, vocab + 8)
    assert shared == vocab + 8
    assert "-inf" in caplog.text
    padded_student = make_llama(vocab + 8, layers=1)
    logits = student_logits(padded_student, torch.randint(0, vocab, (1, 5)), shared)
    assert logits.shape == (1, 5, vocab + 8)
    cut = student_logits(padded_student, torch.randint(0, vocab, (1, 5)), vocab)
    assert cut.shape[-1] == vocab


def test_mismatched_tokenizers_name_both_sizes(tiny_tokenizer):
    other = make_tokenizer(vocab_size=300)
    with pytest.raises(ModelError, match=r"384.*300"):
        shared_vocab_rows(tiny_tokenizer, other, 384, 300)


def test_vocabulary_larger_than_output_rows_is_refused(tiny_tokenizer):
    with pytest.raises(ModelError, match="output rows"):
        shared_vocab_rows(tiny_tokenizer, tiny_tokenizer, 100, 100)
