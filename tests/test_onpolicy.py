"""Chat examples (assistant-only targets), on-policy micro-batches and their training path."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_llama

from distill import distill
from distill.config import LossConfig, OnPolicyConfig, TrainConfig
from distill.data import Batch, ExampleBatches
from distill.data.chat import render_chat
from distill.data.examples import detect_format, encode_examples, targets_from_mask
from distill.errors import DataError
from distill.losses import IGNORE_INDEX
from distill.losses.schedule import loss_settings
from distill.sampling import Sampling, sample_continuations
from distill.teacher import LiveTeacher
from distill.train import CausalLMTask, CheckpointPlan, train
from distill.train.causal_lm import micro_batch_terms
from distill.train.onpolicy import OnPolicy, student_batch

CHATS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does a for statement do?"},
        {"role": "assistant", "content": "It repeats a block for each item of a sequence."},
    ],
    [
        {"role": "user", "content": "Name a mutable type."},
        {"role": "assistant", "content": "A list."},
        {"role": "user", "content": "And an immutable one?"},
        {"role": "assistant", "content": "A tuple, or a string."},
    ],
    [
        {"role": "user", "content": "How are exceptions raised?"},
        {"role": "assistant", "content": "With the raise statement and an exception instance."},
    ],
]


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


@pytest.mark.parametrize("chat", CHATS)
def test_mask_covers_exactly_the_assistant_tokens(chat_tokenizer, chat):
    input_ids, assistant = render_chat(chat_tokenizer, chat)
    written = chat_tokenizer.decode(
        [i for i, keep in zip(input_ids, assistant, strict=True) if keep]
    )
    expected = "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")
    assert written == expected
    others = chat_tokenizer.decode(
        [i for i, keep in zip(input_ids, assistant, strict=True) if not keep]
    )
    assert all(m["content"] in others for m in chat if m["role"] != "assistant")
    assert not any(m["content"] in others for m in chat if m["role"] == "assistant")
    assert chat_tokenizer.decode(input_ids) == chat_tokenizer.apply_chat_template(
        chat, tokenize=False
    )


def test_targets_are_the_next_tokens_that_are_assistant_tokens():
    labels = targets_from_mask([5, 6, 7, 8, 9], [False, False, True, True, False])
    assert labels == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]


def test_encoded_examples_are_right_padded_with_prompt_lengths(chat_tokenizer):
    rows = [{"messages": chat} for chat in CHATS]
    examples = encode_examples(rows, "chat", chat_tokenizer, 96, "chats.jsonl")
    assert examples.input_ids.shape == (3, 96)
    for row, chat in enumerate(CHATS):
        ids, assistant = render_chat(chat_tokenizer, chat)
        length = int(examples.lengths[row])
        assert length == min(len(ids), 96)
        assert examples.input_ids[row, :length].tolist() == ids[:length]
        assert (examples.labels[row, length - 1 :] == IGNORE_INDEX).all()
        assert int(examples.prompt_lengths[row]) == assistant.index(True)


def test_rows_without_targets_are_dropped_and_none_left_is_an_error(chat_tokenizer):
    rows = [{"messages": CHATS[0]}, {"messages": [{"role": "user", "content": "Hello?"}]}]
    assert len(encode_examples(rows, "chat", chat_tokenizer, 96, "x.jsonl")) == 1
    with pytest.raises(DataError, match="no row has a target token"):
        encode_examples(rows[1:], "chat", chat_tokenizer, 96, "x.jsonl")


def test_chat_data_without_a_chat_template_is_refused(tiny_tokenizer):
    with pytest.raises(DataError, match="has no chat template"):
        encode_examples([{"messages": CHATS[0]}], "chat", tiny_tokenizer, 64, "chats.jsonl")


def test_format_detection(tmp_path):
    chat, pairs, text = tmp_path / "c.jsonl", tmp_path / "p.jsonl", tmp_path / "t.jsonl"
    chat.write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    pairs.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    text.write_text(json.dumps({"text": "a"}) + "\n")
    assert detect_format(chat, "auto") == "chat"
    assert detect_format(pairs, "auto") == "prompt_response"
    assert detect_format(text, "auto") == "text"
    assert detect_format(None, "auto") == "text"
    assert detect_format(text, "chat") == "chat"


def test_padding_does_not_change_an_examples_loss(chat_tokenizer):
    """Right padding + causal attention: a row's summed terms are the same alone or batched."""
    student = make_llama(len(chat_tokenizer), layers=2, seed=1)
    teacher = LiveTeacher(make_llama(len(chat_tokenizer), layers=2, seed=2))
    examples = encode_examples(
        [{"messages": chat} for chat in CHATS], "chat", chat_tokenizer, 96, "x"
    )
    width = int(examples.lengths.max())
    batch = Batch(
        examples.input_ids[:, :width], examples.labels[:, :width], examples.prompt_lengths
    )
    together = micro_batch_terms(
        student,
        teacher,
        batch.input_ids,
        loss_settings(LossConfig()),
        len(chat_tokenizer),
        labels=batch.labels,
    )
    alone_sum, alone_tokens = 0.0, 0
    for row, length in enumerate(examples.lengths.tolist()):
        terms = micro_batch_terms(
            student,
            teacher,
            examples.input_ids[row : row + 1, :length],
            loss_settings(LossConfig()),
            len(chat_tokenizer),
            labels=examples.labels[row : row + 1, :length],
        )
        alone_sum += float(terms.loss_sum.detach())
        alone_tokens += terms.n_tokens
    assert together.n_tokens == alone_tokens == batch.n_targets
    assert float(together.loss_sum.detach()) == pytest.approx(alone_sum, rel=1e-5)


def test_fully_masked_micro_batch_gives_zero_terms(chat_tokenizer):
    student = make_llama(len(chat_tokenizer), layers=2)
    ids = torch.randint(0, len(chat_tokenizer), (2, 8))
    labels = torch.full_like(ids, IGNORE_INDEX)
    terms = micro_batch_terms(
        student, None, ids, loss_settings(LossConfig()), len(chat_tokenizer), labels=labels
    )
    terms.loss_sum.backward()
    assert terms.n_tokens == 0 and float(terms.loss_sum.detach()) == 0.0
    assert all(float(p.grad.abs().sum()) == 0.0 for p in student.parameters())


def test_on_policy_batch_targets_only_the_generated_tokens(chat_tokenizer):
    student = make_llama(len(chat_tokenizer), layers=2, seed=3)
    examples = encode_examples(
        [{"messages": chat} for chat in CHATS], "chat", chat_tokenizer, 96, "x"
    )
    batch = ExampleBatches(examples, 3, seed=0).next_batch()
    sampling = Sampling(max_new_tokens=6, temperature=1.0)
    eos, pad = chat_tokenizer.eos_token_id, chat_tokenizer.pad_token_id
    torch.manual_seed(5)
    on_policy, lengths = student_batch(student, batch, sampling, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(5)
    prompts = [
        row[:n].tolist()
        for row, n in zip(batch.input_ids, batch.prompt_lengths.tolist(), strict=True)
    ]
    expected = sample_continuations(student, prompts, sampling, eos_token_id=eos, pad_token_id=pad)
    assert lengths == [len(c) for c in expected]
    for row, (prompt, continuation) in enumerate(zip(prompts, expected, strict=True)):
        sequence = on_policy.input_ids[row, : len(prompt) + len(continuation)].tolist()
        assert sequence == prompt + continuation  # the prompt, then the student's own tokens
        targets = on_policy.labels[row]
        kept = (targets != IGNORE_INDEX).nonzero().flatten().tolist()
        assert kept == list(range(len(prompt) - 1, len(prompt) - 1 + len(continuation)))
        assert targets[kept].tolist() == continuation
        assert 1 <= len(continuation) <= 6
        assert eos not in continuation[:-1]  # nothing after an EOS


class _Interrupted(Exception):
    pass


class _InterruptedBatches(ExampleBatches):
    """Raises once ``limit`` micro-batches were drawn: a run killed in the middle."""

    def __init__(self, *args, limit: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit, self.drawn = limit, 0

    def next_batch(self) -> Batch:
        if self.limit is not None and self.drawn >= self.limit:
            raise _Interrupted
        self.drawn += 1
        return super().next_batch()


def _train_chat(chat_tokenizer, onpolicy, checkpoints=None, student=None, stop_after=None):
    torch.manual_seed(0)
    student = student or make_llama(len(chat_tokenizer), layers=2, seed=3).train()
    teacher = LiveTeacher(make_llama(len(chat_tokenizer), layers=2, seed=4))
    examples = encode_examples(
        [{"messages": chat} for chat in CHATS * 2], "chat", chat_tokenizer, 96, "x"
    )
    state = train(
        CausalLMTask(
            student,
            teacher,
            _InterruptedBatches(examples, 2, seed=0, limit=stop_after),
            LossConfig(divergence="jsd"),
            vocab_rows=len(chat_tokenizer),
            onpolicy=onpolicy,
        ),
        TrainConfig(steps=4, batch_size=2, grad_accum=2, warmup_steps=1, lr=1e-2),
        checkpoints=checkpoints,
    )
    return student, state


def _onpolicy(chat_tokenizer, fraction: float) -> OnPolicy:
    config = OnPolicyConfig.model_validate({"lambda": fraction, "max_new_tokens": 5})
    return OnPolicy(config, chat_tokenizer.eos_token_id, chat_tokenizer.pad_token_id, seed=0)


def test_lambda_zero_equals_the_supervised_path(chat_tokenizer):
    supervised, _ = _train_chat(chat_tokenizer, None)
    zero, state = _train_chat(chat_tokenizer, _onpolicy(chat_tokenizer, 0.0))
    for (name, a), b in zip(
        supervised.state_dict().items(), zero.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert "onpolicy_fraction" not in state.history[-1]


def test_lambda_one_trains_on_student_samples_and_logs_it(chat_tokenizer):
    supervised, _ = _train_chat(chat_tokenizer, None)
    student, state = _train_chat(chat_tokenizer, _onpolicy(chat_tokenizer, 1.0))
    assert all(record["onpolicy_fraction"] == 1.0 for record in state.history)
    assert all(1 <= record["generated_tokens_mean"] <= 5 for record in state.history)
    temperature = LossConfig().temperature  # divergence only: loss = T^2 * divergence, no CE
    for record in state.history:
        assert record["loss"] == pytest.approx(temperature**2 * record["divergence"], rel=1e-5)
    differs = any(
        not torch.equal(a, b)
        for a, b in zip(
            supervised.state_dict().values(), student.state_dict().values(), strict=True
        )
    )
    assert differs


def test_on_policy_resume_is_bit_identical(chat_tokenizer, tmp_path):
    whole, _ = _train_chat(chat_tokenizer, _onpolicy(chat_tokenizer, 0.5))
    plan = CheckpointPlan(tmp_path / "ckpt", every=2, keep=2)
    with pytest.raises(_Interrupted):  # killed while drawing step 3's batches
        _train_chat(chat_tokenizer, _onpolicy(chat_tokenizer, 0.5), plan, stop_after=5)
    torch.manual_seed(123)  # a fresh process: other RNG state, other initial weights
    resumed_student = make_llama(len(chat_tokenizer), layers=2, seed=9).train()
    resume = CheckpointPlan(tmp_path / "ckpt", every=2, keep=2, resume=True)
    resumed, state = _train_chat(
        chat_tokenizer, _onpolicy(chat_tokenizer, 0.5), resume, student=resumed_student
    )
    assert [r["step"] for r in state.history] == [1, 2, 3, 4]
    assert 0.0 < sum(r["onpolicy_fraction"] for r in state.history) < 4.0  # both kinds drawn
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_distill_run_on_chat_data_with_on_policy_batches(
    tmp_path, tiny_run_config, tiny_chat_teacher_dir
):
    teacher_dir = tiny_chat_teacher_dir
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS * 4))
    config = copy.deepcopy(tiny_run_config)
    config["teacher"]["path"] = str(teacher_dir)
    config["data"] = {"path": str(data), "block_size": 96, "heldout_fraction": 0.2}
    config["loss"] = {"divergence": "jsd"}
    config["onpolicy"] = {"lambda": 0.5, "max_new_tokens": 4}
    config["eval"]["speed"] = False
    result = distill(config)
    records = [
        json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == 3 and all("onpolicy_fraction" in r for r in records)
    models = result.report["models"]
    # The 2-layer teacher's student keeps both layers: it starts as an exact copy (KL 0), and
    # the on-policy steps (sampled continuations, JSD) move it away from that copy.
    assert models["student_before"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert models["student_after"]["kl_to_teacher"] > 1e-7
    mean_fraction = sum(r["onpolicy_fraction"] for r in records) / len(records)
    assert result.report["training"]["onpolicy_fraction"] == pytest.approx(mean_fraction)
    assert "On-policy micro-batches" in (result.run_dir / "report.md").read_text()


def test_prompt_response_rows_target_the_response_and_eos(tiny_tokenizer):
    rows = [{"prompt": "Question: what is a dict?", "response": " A mapping."}]
    examples = encode_examples(rows, "prompt_response", tiny_tokenizer, 64, "pairs.jsonl")
    ids = examples.input_ids[0, : int(examples.lengths[0])]
    kept = examples.labels[0] != IGNORE_INDEX
    assert tiny_tokenizer.decode(examples.labels[0][kept]) == " A mapping.<|endoftext|>"
    assert tiny_tokenizer.decode(ids[: int(examples.prompt_lengths[0])]) == rows[0]["prompt"]


def test_batch_from_blocks_targets_every_next_token():
    blocks = torch.arange(12).view(2, 6)
    batch = Batch.from_blocks(blocks, prompt_tokens=3)
    assert batch.labels[:, :-1].tolist() == blocks[:, 1:].tolist()
    assert (batch.labels[:, -1] == IGNORE_INDEX).all()
    assert batch.prompt_lengths.tolist() == [3, 3] and batch.n_targets == 10


def test_max_seconds_stops_training_early(chat_tokenizer):
    student = make_llama(len(chat_tokenizer), layers=2, seed=3).train()
    examples = encode_examples(
        [{"messages": chat} for chat in CHATS], "chat", chat_tokenizer, 96, "x"
    )
    config = TrainConfig(steps=50, batch_size=2, warmup_steps=0, max_seconds=1e-6)
    state = train(
        CausalLMTask(
            student,
            None,
            ExampleBatches(examples, 2, seed=0),
            LossConfig(alpha=1.0),
            vocab_rows=len(chat_tokenizer),
        ),
        config,
    )
    assert [record["step"] for record in state.history] == [1]


def test_teacher_scores_on_student_samples_match_a_float64_reference(chat_tokenizer):
    from distill.evaluate.samples import score_student_samples

    student = make_llama(len(chat_tokenizer), layers=2, seed=3)
    teacher_model = make_llama(len(chat_tokenizer), layers=2, seed=4)
    prompts = [chat_tokenizer(text)["input_ids"] for text in ("The for", "A class is", "x")]
    sampling = Sampling(max_new_tokens=6, temperature=1.0)
    eos, pad = chat_tokenizer.eos_token_id, chat_tokenizer.pad_token_id
    scores = score_student_samples(
        student,
        LiveTeacher(teacher_model),
        prompts,
        sampling,
        eos_token_id=eos,
        pad_token_id=pad,
        batch_size=2,
        seed=7,
    )
    # Reference: the same samples (same seed, same batches), each sequence scored alone in float64.
    torch.manual_seed(7)
    samples = []
    for start in (0, 2):
        chunk = prompts[start : start + 2]
        samples += sample_continuations(
            student, chunk, sampling, eos_token_id=eos, pad_token_id=pad
        )
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher_model).double()
    nll, kl, count = 0.0, 0.0, 0
    for prompt, continuation in zip(prompts, samples, strict=True):
        ids = torch.tensor([prompt + continuation])
        positions = range(len(prompt) - 1, len(prompt) - 1 + len(continuation))
        with torch.no_grad():
            p = torch.log_softmax(teacher64(input_ids=ids).logits[0], -1)
            q = torch.log_softmax(student64(input_ids=ids).logits[0], -1)
        for position, token in zip(positions, continuation, strict=True):
            nll -= float(p[position, token])
            kl += float((q[position].exp() * (q[position] - p[position])).sum())
            count += 1
    assert scores["teacher_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert scores["reverse_kl"] == pytest.approx(kl / count, rel=1e-4, abs=1e-7)
    assert scores["generated_tokens_mean"] == pytest.approx(count / 3)


def test_unfinished_answers_have_no_end_of_turn_target(chat_tokenizer, tiny_tokenizer):
    chat = {"messages": CHATS[2], "finished": False}
    cut = encode_examples([chat], "chat", chat_tokenizer, 96, "x")
    whole = encode_examples([{"messages": CHATS[2]}], "chat", chat_tokenizer, 96, "x")
    cut_targets = chat_tokenizer.decode(cut.labels[0][cut.labels[0] != IGNORE_INDEX])
    whole_targets = chat_tokenizer.decode(whole.labels[0][whole.labels[0] != IGNORE_INDEX])
    assert whole_targets == CHATS[2][-1]["content"] + "<|im_end|>\n"
    assert cut_targets == CHATS[2][-1]["content"]
    pair = {"prompt": "Q:", "response": " a dict", "finished": False}
    cut = encode_examples([pair], "prompt_response", tiny_tokenizer, 64, "x")
    assert tiny_tokenizer.decode(cut.labels[0][cut.labels[0] != IGNORE_INDEX]) == " a dict"
