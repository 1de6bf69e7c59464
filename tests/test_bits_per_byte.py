"""Bits per UTF-8 byte: by hand on a bigram model, against a float64 reference on a tiny Llama,
the same byte count under two tokenizations, the cut into pieces, and the teacher's bits per
byte of another vocabulary's samples."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama, make_tokenizer

from distill.data import default_documents
from distill.errors import ModelError
from distill.evaluate.bits_per_byte import (
    bits_per_byte,
    start_token,
    teacher_bits_per_byte_of_samples,
    text_pieces,
)
from distill.sampling import Sampling, sample_continuations


class BigramModel(torch.nn.Module):
    """Next-token probabilities depend on the previous token only (hand-checkable)."""

    PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.PROBS.log()[input_ids].float())


class CharTokenizer:
    """'y' -> 1, 'z' -> 2, any other character -> 0; EOS = 0."""

    eos_token_id, bos_token_id = 0, None

    def __len__(self) -> int:
        return 3

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[{"y": 1, "z": 2}.get(ch, 0) for ch in text] for text in texts]}


def test_bits_per_byte_by_hand():
    # "yzé": start 0, then y=1, z=2, é=0: -ln p(1|0) - ln p(2|1) - ln p(0|2) over 4 bytes;
    # "zz": -ln p(2|0) - ln p(2|2) over 2 bytes.
    nll = -math.log(0.25) - math.log(0.1) - math.log(0.2) - math.log(0.25) - math.log(0.6)
    got = bits_per_byte(BigramModel(), CharTokenizer(), ["yzé", "zz"], batch_size=1)
    assert got["bytes"] == 6 and got["tokens"] == 5
    assert got["nll_nats"] == pytest.approx(nll, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(nll / (6 * math.log(2)), rel=1e-6)


def reference_bits_per_byte(model, tokenizer, texts) -> float:
    """One text at a time, no padding, float64 log-softmax over the tokenizer's rows."""
    nll, n_bytes = 0.0, 0
    for text in texts:
        ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1, : len(tokenizer)].double()
        logprobs = F.log_softmax(logits, dim=-1)
        nll -= sum(float(logprobs[t, ids[t + 1]]) for t in range(len(ids) - 1))
        n_bytes += len(text.encode("utf-8"))
    return nll / (math.log(2) * n_bytes)


def test_bits_per_byte_matches_float64_reference_with_padded_batches(tiny_tokenizer):
    model = make_llama(len(tiny_tokenizer), layers=2, hidden=16, seed=1)
    texts = ["The for statement", "Exceptions are raised when é", "x", "A class definition: ∑"]
    got = bits_per_byte(model, tiny_tokenizer, texts, batch_size=3)  # rows of unequal length
    expected = reference_bits_per_byte(model, tiny_tokenizer, texts)
    assert got["bits_per_byte"] == pytest.approx(expected, rel=1e-5)  # float32 logits


def test_two_tokenizations_of_the_same_text_count_the_same_bytes(tiny_tokenizer):
    other = make_tokenizer(vocab_size=290)  # fewer merges: more tokens for the same text
    model = make_llama(len(tiny_tokenizer), layers=1, hidden=16, seed=2)  # rows cover both
    texts = ["The Python for statement iterates", "naïve café: ünïcode \U0001f600"]
    fine = bits_per_byte(model, tiny_tokenizer, texts)
    coarse = bits_per_byte(model, other, texts)
    assert fine["bytes"] == coarse["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert coarse["tokens"] > fine["tokens"]
    assert coarse["nll_nats"] != pytest.approx(fine["nll_nats"], rel=1e-3)
    # each tokenizer's tokens spell exactly the text's bytes
    for tokenizer in (tiny_tokenizer, other):
        for text in texts:
            assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_text_pieces_cover_documents_at_word_boundaries():
    documents = default_documents()[:3]
    pieces = text_pieces(documents, max_bytes=10**9, piece_chars=100)
    assert "".join(pieces) == "".join(documents)
    assert all(len(piece) <= 100 for piece in pieces)
    # a piece starts with whitespace unless it starts a document (no word is cut)
    assert sum(not piece[0].isspace() for piece in pieces) == len(documents)
    capped = text_pieces(documents, max_bytes=1000, piece_chars=100)
    assert 800 < sum(len(p.encode("utf-8")) for p in capped) <= 1000
    index = [pieces.index(piece) for piece in capped]  # spread over the text, in order
    assert index == sorted(index) and index[0] == 0 and index[-1] == len(pieces) - 1


def test_start_token_needs_eos_or_bos():
    assert start_token(CharTokenizer()) == 0
    bare = SimpleNamespace(eos_token_id=None, bos_token_id=None)
    with pytest.raises(ModelError, match="neither an EOS nor a BOS"):
        start_token(bare)


def reference_sample_bpb(model, tokenizer, teacher, teacher_tokenizer, prompts, seed):
    """Sample as the scorer does, decode, re-tokenize, score token by token in float64."""
    start = tokenizer.eos_token_id
    torch.manual_seed(seed)
    prompt_ids = [[start, *tokenizer(p)["input_ids"]] for p in prompts]
    sampled = sample_continuations(
        model, prompt_ids, Sampling(6, 1.0, 1.0), eos_token_id=start, pad_token_id=start
    )
    nll, n_bytes = 0.0, 0
    for prompt, ids in zip(prompts, sampled, strict=True):
        text = tokenizer.decode([i for i in ids if i != start])
        context = [teacher_tokenizer.eos_token_id, *teacher_tokenizer(prompt)["input_ids"]]
        sequence = context + teacher_tokenizer(text)["input_ids"]
        with torch.no_grad():
            logprobs = F.log_softmax(teacher(torch.tensor([sequence])).logits[0].double(), -1)
        nll -= sum(float(logprobs[t - 1, sequence[t]]) for t in range(len(context), len(sequence)))
        n_bytes += len(text.encode("utf-8"))
    return nll / (math.log(2) * n_bytes), n_bytes


def test_teacher_scores_samples_of_another_vocabulary_per_byte(tiny_tokenizer):
    """A student of another vocabulary writes text; the teacher re-tokenizes and scores it (and
    its own samples, the floor) against the float64 reference."""
    student_tokenizer = make_tokenizer(vocab_size=290)
    teacher = make_llama(len(tiny_tokenizer), layers=2, hidden=16, seed=3)
    student = make_llama(len(student_tokenizer), layers=1, hidden=16, seed=4)
    prompts = ["The for statement", "A class"]
    pairs = {"teacher": (teacher, tiny_tokenizer), "student": (student, student_tokenizer)}
    got = teacher_bits_per_byte_of_samples(
        pairs, teacher, tiny_tokenizer, prompts, new_tokens=6, seed=0
    )
    for name, (model, tokenizer) in pairs.items():
        expected, n_bytes = reference_sample_bpb(
            model, tokenizer, teacher, tiny_tokenizer, prompts, seed=0
        )
        assert got[name]["sample_bytes"] == n_bytes > 0, name
        assert got[name]["teacher_sample_bpb"] == pytest.approx(expected, rel=1e-5), name
