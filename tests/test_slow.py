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


def test_real_chat_template_masks_and_on_policy_samples(real_teacher):
    """SmolLM2's own template: targets are exactly the assistant turns (with <|im_end|>), and
    a student sampled from those prompts stops at <|im_end|> or max_new_tokens."""
    from distill.data import Batch
    from distill.data.examples import encode_examples
    from distill.losses import IGNORE_INDEX
    from distill.sampling import Sampling
    from distill.train.onpolicy import student_batch

    tokenizer = load_tokenizer(default_teacher_path())
    chat = [
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "A mutable sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."},
    ]
    examples = encode_examples([{"messages": chat}], "chat", tokenizer, 256, "chat")
    targets = examples.labels[0][examples.labels[0] != IGNORE_INDEX]
    assert (
        tokenizer.decode(targets) == "A mutable sequence.<|im_end|>\nAn immutable one.<|im_end|>\n"
    )
    batch = Batch(examples.input_ids, examples.labels, examples.prompt_lengths)
    torch.manual_seed(0)
    sampled, lengths = student_batch(
        real_teacher,
        batch,
        Sampling(max_new_tokens=24, temperature=0.7, top_p=0.9),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generated = sampled.labels[0][sampled.labels[0] != IGNORE_INDEX].tolist()
    assert 1 <= len(generated) == lengths[0] <= 24
    assert tokenizer.eos_token_id not in generated[:-1]
