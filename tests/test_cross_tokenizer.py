"""Cross-tokenizer distillation: byte alignment, the group distributions and losses against
float64 references, the training task, and `distill run` with a student of another tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import CHATML_TEMPLATE, make_llama, save_model
from references import (
    reference_group_distribution,
    reference_hybrid,
    reference_uld,
)
from test_checkpoint import distill_cli, steps_logged, student_weights, torchrun
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import distill
from distill.config import LossConfig, TrainConfig, load_config
from distill.data import pack_documents
from distill.data.alignment import (
    ByteVocab,
    align_spans,
    check_tokenizer_pair,
    string_pairs,
    unsupported_reason,
)
from distill.data.cross_examples import CrossExampleBatches, encode_cross_examples
from distill.data.cross_tokenizer import TokenizerPair
from distill.errors import ConfigError, ModelError
from distill.losses.cross_tokenizer import (
    group_divergence,
    group_rows,
    merged_group_logprobs,
    uld,
)
from distill.losses.functional import forward_kl
from distill.losses.schedule import LossSettings
from distill.teacher import LiveTeacher
from distill.train.causal_lm import micro_batch_terms
from distill.train.cross_tokenizer import (
    CrossTokenizerTask,
    cross_tokenizer_batches,
    cross_tokenizer_terms,
    token_pairs,
    train_cross_tokenizer,
)
from distill.train.distributed import DistContext
from distill.train.loop import CheckpointPlan

# Each tokenizer learns its merges from its own few lines, so the two split text differently.
TEACHER_LINES = [
    "The teacher reads the whole text, then the student reads the same bytes again.",
    "Unicode: café, naïve, façade, crème brûlée; 東京 and 世界; emoji 🙂🎉 at the end.",
    "def answer(question):\n    return question.strip()  # indented code\n",
    "Whitespace   runs,\ttabs\tand\n\nblank lines are merged by some tokenizers.",
] * 4
STUDENT_LINES = [
    "A student model learns from a teacher model with another vocabulary of tokens.",
    "Distillation aligns tokens on bytes: the groups end where both sides end.",
    "Numbers 12345 and symbols #@! appear, with accents like é and ü now and then.",
] * 4
TEXTS = [
    "Ça coûte 5 € — naïve café, crème brûlée.",
    "東京の天気は晴れ。世界 🙂🎉 emoji, then ASCII.",
    "Whitespace   runs,\ttabs\tand\n\n  blank lines   \n",
    "The teacher reads the whole text; the student reads the same bytes.",
    "Distillation aligns another vocabulary: numbers 12345 and symbols #@!",
]
CHAT_ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Say hello in French."},
            {"role": "assistant", "content": "Bonjour ! Ça va très bien, merci."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name two cities."},
            {"role": "assistant", "content": "Tokyo (東京) and Paris."},
            {"role": "user", "content": "One more?"},
            {"role": "assistant", "content": "Rome 🙂"},
        ]
    },
]
# A second chat format: its own markers and end-of-turn token.
TAGGED_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '</s>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _tokenizer(lines: list[str], vocab_size: int, specials: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


@pytest.fixture(scope="module")
def teacher_tokenizer() -> PreTrainedTokenizerFast:
    """~400 tokens, ChatML (EOS = <|im_end|>, pad = <|endoftext|>)."""
    backend = _tokenizer(TEACHER_LINES, 400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _student_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """~300 tokens of other text, another chat format (EOS = </s>); its BOS <s>, which the
    teacher lacks, starts every encoded text and chat rendering when ``adds_bos``."""
    specials = ["</s>", "<s>", "<|system|>", "<|user|>", "<|assistant|>"]
    backend = _tokenizer(STUDENT_LINES, 300, specials)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", bos_token="<s>", pad_token="</s>"
    )
    tokenizer.chat_template = ("{{ bos_token }}" if adds_bos else "") + TAGGED_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def student_tokenizer() -> PreTrainedTokenizerFast:
    return _student_tokenizer(adds_bos=False)


@pytest.fixture(scope="module")
def pair(teacher_tokenizer, student_tokenizer) -> TokenizerPair:
    return TokenizerPair(teacher_tokenizer, student_tokenizer)


@pytest.fixture(scope="module")
def bos_pair(teacher_tokenizer) -> TokenizerPair:
    """The teacher with a student that adds a BOS the teacher has no partner for."""
    return TokenizerPair(teacher_tokenizer, _student_tokenizer(adds_bos=True))


def _spans(vocab: ByteVocab, ids: list[int]) -> list[tuple[int, int]]:
    spans, position = [], 0
    for token in ids:
        width = len(vocab.token_bytes[token] or b"")
        spans.append((position, position + width))
        position += width
    return spans


def _assert_tiles(text: bytes, sides, groups) -> None:
    """Every byte of ``text`` in exactly one group, on both sides, each group the same bytes."""
    assert groups[0][0] == 0 and groups[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:], strict=False))
    for vocab, ids, group_of in sides:
        assert all(g >= 0 for g in group_of)
        for number, (start, end) in enumerate(groups):
            spelled = vocab.text_bytes(
                [t for t, g in zip(ids, group_of, strict=True) if g == number]
            )
            assert spelled == text[start:end]


# --- alignment --------------------------------------------------------------------------


def test_both_tokenizers_are_supported_and_differ(teacher_tokenizer, student_tokenizer):
    assert unsupported_reason(teacher_tokenizer) is None
    assert unsupported_reason(student_tokenizer) is None
    assert teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab()
    assert 250 < len(student_tokenizer) < len(teacher_tokenizer) <= 400


@pytest.mark.parametrize("text", TEXTS)
def test_groups_cover_every_byte_once_on_both_sides(text, pair):
    data = text.encode()
    teacher_ids = pair.teacher(text, add_special_tokens=False)["input_ids"]
    student_ids = pair.student(text, add_special_tokens=False)["input_ids"]
    assert pair.teacher_vocab.text_bytes(teacher_ids) == data
    student_groups, teacher_groups, groups = align_spans(
        _spans(pair.student_vocab, student_ids), _spans(pair.teacher_vocab, teacher_ids)
    )
    _assert_tiles(
        data,
        [
            (pair.student_vocab, student_ids, student_groups),
            (pair.teacher_vocab, teacher_ids, teacher_groups),
        ],
        groups,
    )


def test_multi_token_groups_and_split_characters_occur(pair):
    """The texts exercise what the alignment is for: a character split between tokens, and
    groups of several tokens (whitespace runs, words) on one side."""
    text = "".join(TEXTS)
    teacher_ids = pair.teacher(text, add_special_tokens=False)["input_ids"]
    student_ids = pair.student(text, add_special_tokens=False)["input_ids"]
    student_groups, teacher_groups, groups = align_spans(
        _spans(pair.student_vocab, student_ids), _spans(pair.teacher_vocab, teacher_ids)
    )
    for group_of in (student_groups, teacher_groups):  # several tokens in a group: both sides
        assert max(group_of.count(g) for g in range(len(groups))) > 1
    pieces = [pair.student_vocab.token_bytes[t] for t in student_ids]
    assert any(p[0] & 0xC0 == 0x80 for p in pieces), "no token starts inside a character"


def test_a_bos_on_one_side_joins_the_first_group(pair):
    text = TEXTS[1]
    bos = pair.student.bos_token_id
    student_ids = [bos, *pair.student(text, add_special_tokens=False)["input_ids"]]
    teacher_ids = pair.teacher(text, add_special_tokens=False)["input_ids"]
    student_spans = [(0, 0), *_spans(pair.student_vocab, student_ids[1:])]
    student_groups, teacher_groups, groups = align_spans(
        student_spans, _spans(pair.teacher_vocab, teacher_ids)
    )
    assert student_groups[0] == 0 == teacher_groups[0]
    _assert_tiles(
        text.encode(),
        [
            (pair.student_vocab, student_ids, student_groups),
            (pair.teacher_vocab, teacher_ids, teacher_groups),
        ],
        groups,
    )


def test_a_bos_the_teacher_lacks_joins_the_group_it_starts_in_a_block(bos_pair, monkeypatch):
    """Through :meth:`TokenizerPair.align_block`: a student BOS with no teacher partner is width
    zero and joins the group that starts where it sits (the row's first; after an EOS, the next
    document's first, scored there), and every byte is in exactly one group on both sides."""
    student, bos = bos_pair.student, bos_pair.student.bos_token_id
    assert bos_pair.partner(bos) is None
    found = []  # what align_block groups, before only the scored groups are kept

    def grouped(*sides):
        found.append(align_spans(*sides))
        return found[-1]

    monkeypatch.setattr("distill.data.cross_tokenizer.align_spans", grouped)
    text = TEXTS[1]
    ids = student(text)["input_ids"]
    assert ids[0] == bos and bos not in ids[1:]
    row = bos_pair.align_block(ids)
    student_groups, teacher_groups, groups = found[-1]
    assert student_groups[0] == student_groups[1] == 0 == teacher_groups[0]
    _assert_tiles(
        text.encode(),
        [
            (bos_pair.student_vocab, ids, student_groups),
            (bos_pair.teacher_vocab, row.teacher_ids, teacher_groups),
        ],
        groups,
    )
    second = len(ids) + 1  # the next document's BOS, after the EOS
    block = [*ids, student.eos_token_id, *student(TEXTS[0])["input_ids"]]
    row = bos_pair.align_block(block)
    student_groups, teacher_groups, _ = found[-1]
    assert min(student_groups + teacher_groups) == 0  # every token in a group
    assert student_groups[second] == student_groups[second + 1]
    assert bos_pair.teacher_vocab.text_bytes(row.teacher_ids) == (text + TEXTS[0]).encode()
    number = row.student_groups[second]
    assert number >= 0 and row.student_groups[second + 1] == number
    s_tokens = [t for t, g in zip(block, row.student_groups, strict=True) if g == number]
    t_tokens = [t for t, g in zip(row.teacher_ids, row.teacher_groups, strict=True) if g == number]
    assert s_tokens[0] == bos and not any(map(bos_pair.teacher_vocab.is_special, t_tokens))
    assert bos_pair.student_vocab.text_bytes(s_tokens) == bos_pair.teacher_vocab.text_bytes(
        t_tokens
    )


def test_packed_blocks_align_on_bytes_with_documents_ends(pair):
    """Blocks cut anywhere (inside a character too): every scored group spells the same bytes
    on both sides, the EOS between documents pairs with the teacher's EOS, and a group is
    scored only when a row predicts it on both sides."""
    blocks = pack_documents(TEXTS, pair.student, 24)
    batch = pair.align_blocks(blocks)
    assert batch.n_groups > 0
    for row in range(blocks.shape[0]):
        student_ids = batch.student.input_ids[row].tolist()
        teacher_ids = batch.teacher_ids[row].tolist()
        s_groups, t_groups = batch.student_groups[row].tolist(), batch.teacher_groups[row].tolist()
        assert s_groups[0] == -1 and t_groups[0] == -1
        for number in range(max(s_groups) + 1):
            s_tokens = [t for t, g in zip(student_ids, s_groups, strict=True) if g == number]
            t_tokens = [t for t, g in zip(teacher_ids, t_groups, strict=True) if g == number]
            if s_tokens == [pair.student.eos_token_id]:
                assert t_tokens == [pair.teacher.eos_token_id]
            else:
                assert pair.student_vocab.text_bytes(s_tokens) == pair.teacher_vocab.text_bytes(
                    t_tokens
                )


def test_identical_tokenizers_give_one_token_groups(teacher_tokenizer):
    same = TokenizerPair(teacher_tokenizer, teacher_tokenizer)
    batch = same.align_blocks(pack_documents(TEXTS, teacher_tokenizer, 16))
    for row in range(batch.student_groups.shape[0]):  # blocks cut inside characters too
        groups = batch.student_groups[row]
        scored = groups[groups >= 0]
        assert torch.equal(scored, torch.arange(len(scored)))  # one token each, in order
        teacher_groups = batch.teacher_groups[row]
        assert torch.equal(
            batch.teacher_ids[row][teacher_groups >= 0], batch.student.input_ids[row][groups >= 0]
        )
    ascii_blocks = pack_documents(TEXTS[3:], teacher_tokenizer, 16)
    batch = same.align_blocks(ascii_blocks)
    expected = torch.arange(-1, 15).expand(ascii_blocks.shape[0], -1)
    assert torch.equal(batch.student_groups, expected)
    assert torch.equal(batch.teacher_ids, ascii_blocks)
    assert torch.equal(batch.teacher_groups, expected)
    teacher_ids, student_ids = string_pairs(
        same.teacher_vocab, same.student_vocab, len(teacher_tokenizer), len(teacher_tokenizer)
    )
    assert teacher_ids == student_ids == list(range(len(teacher_tokenizer)))


@pytest.mark.parametrize("pair_name", ["pair", "bos_pair"])
def test_chat_rows_align_the_assistant_content_across_templates(pair_name, request):
    """Each side renders the conversation in its own template; the scored groups are the
    assistant's content bytes and its end of turn (<|im_end|> with </s>), nothing else (not
    the BOS that only the student's template starts with, in ``bos_pair``)."""
    pair = request.getfixturevalue(pair_name)
    examples = encode_cross_examples(CHAT_ROWS, "chat", pair, 128, "chat.jsonl")
    for row in range(len(examples)):
        s_ids = examples.student.input_ids[row].tolist()
        assert (s_ids[0] == pair.student.bos_token_id) == (pair_name == "bos_pair")
        t_ids = examples.teacher_ids[row].tolist()
        s_groups = examples.student_groups[row].tolist()
        t_groups = examples.teacher_groups[row].tolist()
        labels = examples.student.labels[row].tolist()
        content, ends = b"", 0
        for number in range(max(s_groups) + 1):
            s_tokens = [t for t, g in zip(s_ids, s_groups, strict=True) if g == number]
            t_tokens = [t for t, g in zip(t_ids, t_groups, strict=True) if g == number]
            if s_tokens == [pair.student.eos_token_id]:
                assert t_tokens == [pair.teacher.eos_token_id]
                ends += 1
                continue
            assert not any(map(pair.student_vocab.is_special, s_tokens))
            assert not any(map(pair.teacher_vocab.is_special, t_tokens))
            assert pair.student_vocab.text_bytes(s_tokens) == pair.teacher_vocab.text_bytes(
                t_tokens
            )
            content += pair.student_vocab.text_bytes(s_tokens)
        for index, group in enumerate(s_groups):  # every scored student token is a target
            if group >= 0:
                assert labels[index - 1] == s_ids[index]
        answers = [m["content"] for m in CHAT_ROWS[row]["messages"] if m["role"] == "assistant"]
        assert content == "".join(answers).encode()  # both templates cut at token boundaries
        assert ends == len(answers)  # each turn's end: </s> on one side, <|im_end|> on the other


# --- losses ------------------------------------------------------------------------------


def _random_groups(rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Group ids ``[rows, length]``: position 0 unscored, then groups of 1-3 tokens, a gap."""
    groups = torch.full((rows, length), -1)
    for row in range(rows):
        position, number = 1, 0
        while position < length - 1:
            size = int(torch.randint(1, 4, (1,), generator=generator))
            if number == 2:
                position += 1  # an unscored token between groups
            groups[row, position : position + size] = number
            position, number = position + size, number + 1
    return groups


def test_merged_group_probability_is_the_chain_rule_product():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 12, 9, dtype=torch.float64, generator=generator)
    ids = torch.randint(0, 9, (2, 12), generator=generator)
    groups = _random_groups(2, 12, generator)
    rows = group_rows(ids, groups)
    merged = merged_group_logprobs(logits.reshape(-1, 9), rows, temperature=1.7).exp()
    key = 0
    for row in range(2):
        for number in range(int(groups[row].max()) + 1):
            positions = (groups[row] == number).nonzero().flatten().tolist()
            tokens = ids[row, positions].tolist()
            expected = reference_group_distribution(
                logits[row, [p - 1 for p in positions]], tokens, temperature=1.7
            )
            torch.testing.assert_close(merged[key], expected, rtol=1e-12, atol=1e-14)
            key += 1
    assert key == rows.n_groups
    torch.testing.assert_close(merged.sum(-1), torch.ones(key, dtype=torch.float64))


def test_uld_is_zero_for_equal_sorted_vectors_and_blind_to_permutations():
    generator = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(5, 7, dtype=torch.float64, generator=generator), -1)
    q = torch.softmax(torch.randn(5, 11, dtype=torch.float64, generator=generator), -1)
    shuffled = p[:, torch.randperm(7, generator=generator)]
    assert torch.equal(uld(p, shuffled), torch.zeros(5, dtype=torch.float64))
    permuted = uld(shuffled, q[:, torch.randperm(11, generator=generator)])
    torch.testing.assert_close(permuted, uld(p, q), rtol=0, atol=1e-15)
    for row in range(5):
        assert float(uld(p, q)[row]) == pytest.approx(reference_uld(p[row], q[row]), abs=1e-14)
        for top_k in (1, 3, 7):  # the k largest of each side, then one tail entry each
            expected = reference_uld(p[row], q[row], top_k)
            assert float(uld(p, q, top_k)[row]) == pytest.approx(expected, abs=1e-14)
    torch.testing.assert_close(uld(p, q, 11), uld(p, q), rtol=0, atol=1e-15)  # k covers both
    zeros = torch.zeros(5, dtype=torch.float64)  # the tails' sums: rounding only
    torch.testing.assert_close(uld(p, shuffled, 3), zeros, rtol=0, atol=1e-15)


def test_hybrid_matches_its_reference_on_different_vocabularies():
    """Random teacher (V=10) and student (V=8) with a partial map of equal tokens, groups of
    1-3 tokens on each side: the hybrid equals its float64 definition, group by group."""
    generator = torch.Generator().manual_seed(3)
    teacher_logits = torch.randn(2, 14, 10, dtype=torch.float64, generator=generator)
    student_logits = torch.randn(2, 12, 8, dtype=torch.float64, generator=generator)
    teacher_ids = torch.randint(0, 10, (2, 14), generator=generator)
    student_ids = torch.randint(0, 8, (2, 12), generator=generator)
    teacher_groups = _random_groups(2, 14, generator)
    student_groups = _random_groups(2, 12, generator)
    per_row = torch.minimum(teacher_groups.max(1).values, student_groups.max(1).values)
    teacher_groups[teacher_groups > per_row[:, None]] = -1
    student_groups[student_groups > per_row[:, None]] = -1
    pairs = [(0, 0), (2, 1), (3, 5), (7, 2), (9, 7)]
    teacher_ids[0, (teacher_groups[0] == 0).nonzero()[0]] = 2  # group 0 starts with a pair
    student_ids[0, (student_groups[0] == 0).nonzero()[0]] = 1
    teacher_ids[1, (teacher_groups[1] == 0).nonzero()[0]] = 0  # the first pair, broken alone
    student_ids[1, (student_groups[1] == 0).nonzero()[0]] = 3
    pair_tensors = (torch.tensor([t for t, _ in pairs]), torch.tensor([s for _, s in pairs]))
    values = group_divergence(
        student_logits,
        teacher_logits,
        student_ids,
        teacher_ids,
        student_groups,
        teacher_groups,
        kind="hybrid",
        temperature=2.0,
        pairs=pair_tensors,
    )
    p = merged_group_logprobs(
        teacher_logits.reshape(-1, 10), group_rows(teacher_ids, teacher_groups), 2.0
    ).exp()
    q = merged_group_logprobs(
        student_logits.reshape(-1, 8), group_rows(student_ids, student_groups), 2.0
    ).exp()
    teacher_first = group_rows(teacher_ids, teacher_groups).first_ids
    student_first = group_rows(student_ids, student_groups).first_ids
    cases = set()
    for g in range(values.shape[0]):
        firsts = (int(teacher_first[g]), int(student_first[g]))
        expected = reference_hybrid(p[g], q[g], *firsts, pairs)
        assert float(values[g]) == pytest.approx(expected, rel=1e-10, abs=1e-12)
        paired = [firsts[0] in dict(pairs), firsts[1] in dict((s, t) for t, s in pairs)]
        cases.add("chunk pair" if firsts in pairs else f"breaks {sum(paired)} pairs")
        if firsts[0] == pairs[0][0] and not paired[1]:
            cases.add("the teacher alone breaks the first pair")
    # Both first tokens one pair, and first tokens that break no, one or two other pairs.
    assert cases >= {
        "chunk pair",
        "breaks 0 pairs",
        "breaks 1 pairs",
        "breaks 2 pairs",
        "the teacher alone breaks the first pair",
    }, cases

    def total(logits: torch.Tensor) -> torch.Tensor:
        return group_divergence(
            logits,
            teacher_logits,
            student_ids,
            teacher_ids,
            student_groups,
            teacher_groups,
            kind="hybrid",
            temperature=2.0,
            pairs=pair_tensors,
        ).sum()

    # The gradient along a random direction equals the central difference (float64).
    logits = student_logits.clone().requires_grad_(True)
    total(logits).backward()
    direction = torch.randn(student_logits.shape, dtype=torch.float64, generator=generator)
    step = 1e-6
    difference = (
        total(student_logits + step * direction) - total(student_logits - step * direction)
    ) / (2 * step)
    assert float((logits.grad * direction).sum()) == pytest.approx(float(difference), rel=1e-6)


def test_hybrid_with_identical_tokenizers_is_forward_kl(teacher_tokenizer):
    same = TokenizerPair(teacher_tokenizer, teacher_tokenizer)
    blocks = pack_documents(TEXTS[3:], teacher_tokenizer, 16)[:3]
    batch = same.align_blocks(blocks)
    generator = torch.Generator().manual_seed(4)
    vocab = len(teacher_tokenizer)
    student = torch.randn(3, 16, vocab, dtype=torch.float64, generator=generator)
    teacher = torch.randn(3, 16, vocab, dtype=torch.float64, generator=generator)
    pairs = token_pairs(same, vocab, vocab)
    hybrid = group_divergence(
        student,
        teacher,
        batch.student.input_ids,
        batch.teacher_ids,
        batch.student_groups,
        batch.teacher_groups,
        kind="hybrid",
        temperature=2.0,
        pairs=pairs,
    ).sum()
    expected = forward_kl(
        student[:, :-1].reshape(-1, vocab), teacher[:, :-1].reshape(-1, vocab), temperature=2.0
    )
    assert float(hybrid) == pytest.approx(float(expected), rel=1e-12)


# --- training ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(teacher_tokenizer, student_tokenizer):
    return (
        make_llama(len(teacher_tokenizer), layers=2, seed=1),
        make_llama(len(student_tokenizer), layers=1, seed=2),
    )


def test_identical_tokenizers_train_like_the_same_tokenizer_path(teacher_tokenizer, tiny_models):
    """The cross-tokenizer task on one tokenizer (hybrid) takes the same loss as distill's
    causal-LM loss with forward KL on the full vocabulary."""
    teacher, _ = tiny_models
    student = make_llama(len(teacher_tokenizer), layers=1, seed=3)
    same = TokenizerPair(teacher_tokenizer, teacher_tokenizer)
    blocks = pack_documents(TEXTS[3:], teacher_tokenizer, 16)[:2]
    vocab = len(teacher_tokenizer)
    settings = LossSettings(2.0, 0.5, fused=False, cross_tokenizer="hybrid")
    live = LiveTeacher(teacher, vocab)
    cross = cross_tokenizer_terms(
        student, live, same.align_blocks(blocks), settings, vocab, token_pairs(same, vocab, vocab)
    )
    plain = micro_batch_terms(student, live, blocks, settings, vocab)
    assert cross.loss_sum.item() == pytest.approx(plain.loss_sum.item(), rel=1e-5)
    assert cross.n_tokens == plain.n_tokens


def test_a_window_of_two_micro_batches_equals_one_batch(pair, tiny_models):
    """The loop's contract holds for the task: batch 2 x accumulation 1 == 1 x 2."""
    teacher, student = tiny_models
    blocks = pack_documents(TEXTS * 2, pair.student, 16)
    states = []
    for batch_size, accumulation in ((2, 1), (1, 2)):
        copy = make_llama(len(pair.student), layers=1, seed=2)
        train_cross_tokenizer(
            copy,
            pair.student,
            teacher,
            pair.teacher,
            blocks,
            LossConfig(cross_tokenizer="uld", alpha=0.3),
            TrainConfig(steps=1, batch_size=batch_size, grad_accum=accumulation, device="cpu"),
            seed=5,
        )
        states.append(copy.state_dict())
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=1e-4, atol=1e-6)


def test_labels_only_never_runs_the_teacher(pair, tiny_models):
    _, student = tiny_models
    blocks = pack_documents(TEXTS, pair.student, 16)
    state = train_cross_tokenizer(
        student,
        pair.student,
        None,
        pair.teacher,
        blocks,
        LossConfig(alpha=1.0),
        TrainConfig(steps=2, batch_size=2, warmup_steps=0, device="cpu"),
    )
    assert [record["divergence"] for record in state.history] == [0.0, 0.0]
    assert all(record["ce"] > 0 for record in state.history)


def test_chat_batches_train(pair, tiny_models):
    teacher, student = tiny_models
    examples = encode_cross_examples(CHAT_ROWS, "chat", pair, 64, "chat.jsonl")
    batches = cross_tokenizer_batches(examples, pair, 2, 0)
    assert isinstance(batches, CrossExampleBatches)
    task = CrossTokenizerTask(
        student,
        LiveTeacher(teacher, len(pair.teacher)),
        batches,
        LossConfig(cross_tokenizer="hybrid"),
        student_rows=len(pair.student),
        pairs=token_pairs(pair, len(pair.teacher), len(pair.student)),
    )
    task.start(DistContext(), 1)
    loss_sum, parts = task.terms(task.warmup_batch(), 0)
    assert torch.isfinite(loss_sum) and float(parts["divergence"]) > 0
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


# --- the run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, teacher_tokenizer, student_tokenizer, tiny_models):
    root = tmp_path_factory.mktemp("cross")
    teacher, student = tiny_models
    return (
        save_model(teacher, teacher_tokenizer, root / "teacher"),
        save_model(
            make_llama(len(student_tokenizer), layers=1, seed=2),
            student_tokenizer,
            root / "student",
        ),
    )


def _config(tmp_path, model_dirs, **loss) -> dict:
    teacher_dir, student_dir = model_dirs
    return {
        "name": "cross",
        "output_dir": str(tmp_path / "runs"),
        "teacher": {"path": str(teacher_dir)},
        "student": {"path": str(student_dir)},
        "data": {"block_size": 32},
        "loss": loss,
        "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "threads": 1, "device": "cpu"},
        "eval": {"max_blocks": 2, "batch_size": 2, "speed": False, "every": 0, "extra_data": []},
        "baseline": True,
    }


def test_cross_tokenizer_run_writes_a_student_with_its_own_tokenizer(tmp_path, model_dirs):
    result = distill.distill(_config(tmp_path, model_dirs, cross_tokenizer="hybrid"))
    run_dir = result.run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["divergence"] > 0 for r in records)
    baseline = (run_dir / "metrics_labels_only.jsonl").read_text().splitlines()
    assert [json.loads(line)["divergence"] for line in baseline] == [0.0, 0.0, 0.0]
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    student_tokenizer = AutoTokenizer.from_pretrained(model_dirs[1])
    assert tokenizer.get_vocab() == student_tokenizer.get_vocab()
    ids = tokenizer("naïve café", return_tensors="pt")["input_ids"]
    assert (
        ids.tolist() == student_tokenizer("naïve café", return_tensors="pt")["input_ids"].tolist()
    )
    assert reloaded(ids).logits.shape[-1] == len(tokenizer)
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("teacher", "student_after", "student_labels_only"):
        assert report["models"][name]["bits_per_byte"] > 0
    assert "another vocabulary" in report["models"]["student_after"]["token_metrics_absent"]
    assert "its own vocabulary" in report["verdict"]


def test_a_student_of_the_teachers_vocabulary_gets_token_level_metrics(
    tmp_path, model_dirs, teacher_tokenizer
):
    """A cross-tokenizer run whose student kept the teacher's vocabulary: its report has KL and
    agreement (rows of one vocabulary), beside bits per byte (docs/cross-tokenizer.md)."""
    student = make_llama(len(teacher_tokenizer), layers=1, seed=3)
    student_dir = save_model(student, teacher_tokenizer, tmp_path / "student")
    config = _config(tmp_path, (model_dirs[0], student_dir), cross_tokenizer="uld")
    result = distill.distill(config)
    records = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["divergence"] > 0 for line in records)  # the ULD loss ran
    models = result.report["models"]
    assert models["student_after"]["teacher_sample_bpb"] > 0  # the cross-tokenizer evaluation
    for name in ("student_before", "student_after", "student_labels_only"):
        assert "token_metrics_absent" not in models[name], name
        assert models[name]["kl_to_teacher"] > 0 and 0 <= models[name]["top1_agreement"] <= 1
        assert models[name]["bits_per_byte"] > 0
    markdown = (result.run_dir / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert "KL(" in header and "top-1 agreement" in header and "n/a for" not in markdown


def test_different_tokenizers_need_a_cross_tokenizer_loss(tmp_path, model_dirs):
    with pytest.raises(ModelError, match="loss.cross_tokenizer=uld or hybrid"):
        distill.distill(_config(tmp_path, model_dirs))


def test_unsupported_pair_fails_before_any_model_loads(tmp_path, model_dirs, monkeypatch):
    word_piece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    word_piece.pre_tokenizer = pre_tokenizers.Whitespace()
    word_piece.train_from_iterator(
        STUDENT_LINES, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]"])
    )
    student = PreTrainedTokenizerFast(tokenizer_object=word_piece, unk_token="[UNK]")
    student_dir = save_model(make_llama(len(student), layers=1), student, tmp_path / "wordpiece")
    import distill.pipelines.run_models as run_models

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizers were checked")

    monkeypatch.setattr(run_models, "load_teacher", no_load)
    monkeypatch.setattr(run_models, "load_causal_lm", no_load)
    config = _config(tmp_path, (model_dirs[0], student_dir), cross_tokenizer="uld")
    with pytest.raises(ModelError) as error:
        distill.distill(config)
    message = str(error.value)
    assert "\n" not in message
    assert str(model_dirs[0]) in message and str(student_dir) in message
    assert "WordPiece" in message
    with pytest.raises(ModelError, match="byte-level BPE"):
        check_tokenizer_pair(AutoTokenizer.from_pretrained(model_dirs[0]), student)


@pytest.mark.parametrize(
    "overrides",
    [
        ["teacher.url=http://127.0.0.1:9"],
        ["teacher.cache=/tmp/cache", "loss.temperature_schedule=linear", "loss.temperature_end=1"],
        ["onpolicy.lambda=0.5"],
        ["loss.divergence=reverse_kl"],
        ["parallel.strategy=fsdp"],
    ],
)
def test_config_refuses_what_the_cross_tokenizer_path_cannot_do(overrides):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=["loss.cross_tokenizer=uld", *overrides])
    assert "\n" not in str(error.value) and "cross_tokenizer" in str(error.value)


def test_sequence_level_kd_on_teacher_text_needs_no_alignment(tmp_path, model_dirs):
    """Sequence-level KD: chat rows the teacher wrote (`distill generate` writes these), the
    student trained on them in its own chat template, labels only: no loss.cross_tokenizer."""
    rows = tmp_path / "generations.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in CHAT_ROWS * 4))
    config = _config(tmp_path, model_dirs, alpha=1.0)
    config["data"] = {"path": str(rows), "block_size": 64, "heldout_fraction": 0.3}
    config["baseline"] = False
    result = distill.distill(config)
    records = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["divergence"] for line in records] == [0.0, 0.0, 0.0]
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "student")
    assert tokenizer.chat_template == TAGGED_TEMPLATE


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, pair, tiny_models):
    """Stopped after step 1 and resumed: the data position (blocks aligned when drawn) and
    the weights continue exactly as in an uninterrupted run."""
    teacher, _ = tiny_models
    blocks = pack_documents(TEXTS * 2, pair.student, 16)
    loss = LossConfig(cross_tokenizer="hybrid")
    states = {}
    for name, steps, resume in (("whole", 3, False), ("cut", 1, False), ("cut", 3, True)):
        student = make_llama(len(pair.student), layers=1, seed=2)
        train_cross_tokenizer(
            student,
            pair.student,
            teacher,
            pair.teacher,
            blocks,
            loss,
            TrainConfig(steps=steps, batch_size=2, warmup_steps=1, device="cpu"),
            checkpoints=CheckpointPlan(tmp_path / name, every=1, resume=resume),
        )
        states[name] = student.state_dict()
    for key, value in states["whole"].items():
        assert torch.equal(value, states["cut"][key]), key


def test_two_processes_equal_one_process_across_tokenizers(tmp_path, model_dirs):
    """`distill run` with a student of its own vocabulary (hybrid), 2 gloo ranks x batch 1 ==
    1 process x batch 2: each rank aligns and scores its own rows of the same global batch, the
    normaliser is the target count over both ranks; rtol/atol 1e-5 (float32 summation order,
    as the same-tokenizer DDP test)."""
    weights = {}
    for name, batch_size, launch in (("one", 2, distill_cli), ("two", 1, torchrun)):
        config = _config(tmp_path, model_dirs, cross_tokenizer="hybrid", alpha=0.5)
        config["name"] = name
        config["train"] |= {"steps": 2, "batch_size": batch_size}
        config["eval"] |= {"bits_per_byte": False, "sample_prompts": 0}
        config["baseline"] = False
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = launch("run", "--config", str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("world size 2" in result.stderr) == (name == "two")
        run_dir = tmp_path / "runs" / name
        assert steps_logged(run_dir / "metrics.jsonl") == [1, 2]
        weights[name] = student_weights(run_dir)
    records = {
        name: [
            json.loads(line)
            for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in weights
    }
    for one, two in zip(records["one"], records["two"], strict=True):
        assert two["divergence"] > 0
        for key in ("loss", "ce", "divergence"):
            assert two[key] == pytest.approx(one[key], rel=1e-5), key
    for name, value in weights["one"].items():
        torch.testing.assert_close(weights["two"][name], value, rtol=1e-5, atol=1e-5, msg=name)
