"""Bits per UTF-8 byte: how well a model predicts text, comparable across vocabularies.

Per-token numbers (perplexity, KL, agreement) change with the tokenizer: a model with a smaller
vocabulary spends more tokens on the same text. Per byte they do not. What is counted:

- each text is scored alone, as ``[start] + tokenizer(text, add_special_tokens=False)``; the
  start token is the tokenizer's EOS (the separator before every document in distill's packed
  training blocks), else its BOS. Every token of the text is predicted, the first from the
  start token alone; the start token itself is context, never a target;
- ``bits_per_byte = sum of the tokens' NLL in nats / (ln 2 x UTF-8 bytes of the texts)``, sums
  over all texts before the division. The denominator is the texts' bytes, never the tokens':
  two tokenizations of the same text divide by the same number, and for a byte-level BPE
  tokenizer its tokens spell exactly those bytes;
- padding rows of the output layer beyond the tokenizer's tokens get no probability mass.

:func:`teacher_bits_per_byte_of_samples`: each model continues text prompts with its own
tokenizer; the continuation is decoded to text and re-tokenized by the teacher, which scores it
after the prompt; the teacher's bits per byte of the continuation only.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.errors import ModelError
from distill.sampling import Sampling, sample_continuations

__all__ = [
    "TOKEN_METRICS",
    "start_token",
    "text_pieces",
    "bits_per_byte",
    "teacher_bits_per_byte_of_samples",
    "vocabulary_differs",
]

# Metrics that compare models token by token: only defined when they share a vocabulary.
TOKEN_METRICS = ("perplexity", "kl_to_teacher", "top1_agreement", "top5_agreement", "teacher_nll")


def vocabulary_differs(
    teacher_tokenizer: PreTrainedTokenizerBase, tokenizer: PreTrainedTokenizerBase
) -> str:
    """Why token-level metrics are absent for a model of another vocabulary (report text)."""
    return (
        f"another vocabulary than the teacher's ({len(tokenizer)} tokens, teacher "
        f"{len(teacher_tokenizer)}): per-token metrics compare the same tokens only; "
        "compare bits per byte"
    )


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token every scored text starts from: EOS, else BOS (see the module doc)."""
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if token is None:
        raise ModelError(
            f"tokenizer {type(tokenizer).__name__} has neither an EOS nor a BOS token to start "
            "a text from (bits per byte)"
        )
    return int(token)


def _cut(document: str, piece_chars: int) -> list[str]:
    """``document`` in pieces of at most ``piece_chars`` characters, each cut at the last space
    or newline before the limit when there is one (so words stay whole); joined, the pieces are
    the document."""
    pieces = []
    rest = document
    while rest:
        cut = len(rest)
        if cut > piece_chars:
            space = max(rest.rfind(" ", 1, piece_chars), rest.rfind("\n", 1, piece_chars))
            cut = space if space > 0 else piece_chars
        pieces.append(rest[:cut])
        rest = rest[cut:]
    return pieces


def text_pieces(documents: list[str], max_bytes: int, piece_chars: int) -> list[str]:
    """Pieces of the documents (see :func:`_cut`) holding at most ``max_bytes`` UTF-8 bytes (at
    least one piece): all of them if they fit, else the most that fit taken evenly spaced from
    the first to the last, in order, so a small sample still spans every part of the text."""
    pieces = [piece for document in documents for piece in _cut(document, piece_chars)]
    sizes = [len(piece.encode("utf-8")) for piece in pieces]
    if sum(sizes) <= max_bytes:
        return pieces

    def spaced(count: int) -> list[int]:
        if count == 1:
            return [0]
        return sorted({round(i * (len(pieces) - 1) / (count - 1)) for i in range(count)})

    count = max(1, len(pieces) * max_bytes // sum(sizes))
    while count > 1 and sum(sizes[i] for i in spaced(count)) > max_bytes:
        count -= 1
    return [pieces[i] for i in spaced(count)]


def _device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Output rows that belong to the tokenizer (None: all of them)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows = getattr(head, "out_features", None)
    return min(rows, len(tokenizer)) if rows is not None else None


@torch.no_grad()
def _sequence_nll(
    model: torch.nn.Module, sequences: list[list[int]], scored_from: list[int], rows: int | None
) -> float:
    """Sum of NLL in nats of ``sequences[i][scored_from[i]:]``, each token given the ones before
    it (right-padded batch; padding never reaches a real token through causal attention)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    targets = torch.zeros(len(sequences), width - 1, dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        targets[row, scored_from[row] - 1 : len(sequence) - 1] = True
    device = _device(model)
    logits = model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
    ).logits[:, :-1]  # (B, T - 1, V): position t predicts token t + 1
    if rows is not None:
        logits = logits[..., :rows]
    keep = targets.to(device)
    picked = logits[keep].float()  # (n, V)
    labels = input_ids[:, 1:].to(device)[keep]
    nll = torch.logsumexp(picked, dim=-1) - picked.gather(1, labels[:, None]).squeeze(1)
    return float(nll.double().sum())


def bits_per_byte(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    batch_size: int = 4,
) -> dict[str, float]:
    """``{bits_per_byte, nll_nats, bytes, tokens}`` of ``model`` with its own ``tokenizer`` on
    ``texts`` (see the module doc for what is counted)."""
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("texts: nothing to score")
    start = start_token(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sequences = [[start, *ids] for ids in encoded]
    rows = _rows(model, tokenizer)
    was_training = model.training
    model.eval()
    nll = sum(
        _sequence_nll(
            model, sequences[i : i + batch_size], [1] * len(sequences[i : i + batch_size]), rows
        )
        for i in range(0, len(sequences), batch_size)
    )
    model.train(was_training)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {
        "bits_per_byte": nll / (math.log(2) * n_bytes),
        "nll_nats": nll,
        "bytes": n_bytes,
        "tokens": sum(len(ids) for ids in encoded),
    }


def _continuation_text(
    tokenizer: PreTrainedTokenizerBase, continuation: list[int], eos: int | None
) -> str:
    if continuation and continuation[-1] == eos:
        continuation = continuation[:-1]
    return tokenizer.decode(
        continuation, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )


def teacher_bits_per_byte_of_samples(
    models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]],
    teacher: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    new_tokens: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """``{name: {teacher_sample_bpb, sample_bytes}}``: each model (with its own tokenizer;
    the teacher may be one of them, the floor) continues ``prompts`` for at most ``new_tokens``
    tokens, sampled at T = 1 from ``seed``; the continuation (up to an EOS, which is not scored)
    is decoded to text and the teacher scores ``[start] + teacher(prompt) + teacher(continuation)``
    on the continuation's tokens only: its NLL in bits per UTF-8 byte of the continuation."""
    sampling = Sampling(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
    teacher_start, rows = start_token(teacher_tokenizer), _rows(teacher, teacher_tokenizer)
    results = {}
    for name, (model, tokenizer) in models.items():
        start, eos = start_token(tokenizer), tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
        prompt_ids = [
            [start, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts
        ]
        torch.manual_seed(seed)
        sampled = sample_continuations(
            model, prompt_ids, sampling, eos_token_id=eos, pad_token_id=pad
        )
        texts = [_continuation_text(tokenizer, ids, eos) for ids in sampled]
        sequences, scored_from, n_bytes = [], [], 0
        for prompt, text in zip(prompts, texts, strict=True):
            if not text:
                continue
            context = [
                teacher_start,
                *teacher_tokenizer(prompt, add_special_tokens=False)["input_ids"],
            ]
            written = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
            sequences.append(context + written)
            scored_from.append(len(context))
            n_bytes += len(text.encode("utf-8"))
        nll = _sequence_nll(teacher.eval(), sequences, scored_from, rows) if sequences else 0.0
        results[name] = {
            "teacher_sample_bpb": nll / (math.log(2) * n_bytes) if n_bytes else None,
            "sample_bytes": n_bytes,
        }
    return results
