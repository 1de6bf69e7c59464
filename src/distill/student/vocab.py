"""Students with a vocabulary of their own: a byte-level BPE tokenizer trained on the training
text (or given), and the student's embedding and head rows moved onto it from the teacher's.

Row initialisation, for each token of the new vocabulary:

- its string is in the teacher's vocabulary (the same bytes; special tokens by content): that
  teacher row is copied;
- otherwise: the mean of the teacher rows of the teacher's tokenisation of its bytes (the BPE
  model alone, so any byte sequence, even part of a UTF-8 character, has one);
- a token the teacher cannot tokenise at all (a hole in a given vocabulary): the mean of all
  teacher rows.

Both the input embedding and, when it is not tied to it, the output head get rows this way, so
the student starts out predicting roughly what it did with the teacher's vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distill.data.alignment import byte_level_string, check_byte_level, check_tokenizer_pair
from distill.errors import ConfigError
from distill.models import load_tokenizer

__all__ = [
    "build_vocabulary",
    "load_vocabulary",
    "row_sources",
    "initial_rows",
    "resize_vocabulary",
]

log = logging.getLogger(__name__)


def _added_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The tokenizer's added (special and chat-marker) tokens, in id order."""
    return [token.content for _, token in sorted(tokenizer.added_tokens_decoder.items())]


def _template(teacher: PreTrainedTokenizerBase, ids: dict[str, int]) -> processors.PostProcessor:
    """The special tokens the teacher adds around a text when it encodes one (e.g. a BOS), as a
    post-processor of the new tokenizer (ids: the new tokenizer's special token ids)."""
    plain = teacher("a", add_special_tokens=False)["input_ids"]
    full = teacher("a")["input_ids"]
    start = next(i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain)
    prefix = teacher.convert_ids_to_tokens(full[:start])
    suffix = teacher.convert_ids_to_tokens(full[start + len(plain) :])
    single = [*prefix, "$A", *suffix]
    pair = [*prefix, "$A", *suffix, *prefix, "$B:1", *[f"{t}:1" for t in suffix]]
    specials = [(token, ids[token]) for token in dict.fromkeys(prefix + suffix)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_vocabulary(
    texts: Iterable[str], vocab_size: int, teacher_tokenizer: PreTrainedTokenizerBase
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts``.

    The teacher's added tokens (end of text, chat markers, ...) come first with the same
    contents and roles (BOS / EOS / pad / unk), and the teacher's chat template and the special
    tokens it adds when encoding are kept, so chat data renders the same way. The 256 byte
    characters are always in the vocabulary (no unknown token). Deterministic for given texts.
    """
    specials = _added_tokens(teacher_tokenizer)
    if vocab_size < 256 + len(specials) + 1:
        raise ConfigError(
            f"student.tokenizer.train_vocab={vocab_size}: a byte-level BPE vocabulary needs more "
            f"than the 256 bytes plus the teacher's {len(specials)} special tokens"
        )
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    ids = {token: backend.token_to_id(token) for token in specials}
    if (
        teacher_tokenizer("a")["input_ids"]
        != teacher_tokenizer("a", add_special_tokens=False)["input_ids"]
    ):
        backend.post_processor = _template(teacher_tokenizer, ids)
    roles = {
        role: getattr(teacher_tokenizer, role)
        for role in ("bos_token", "eos_token", "pad_token", "unk_token")
        if getattr(teacher_tokenizer, role) is not None
    }
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=teacher_tokenizer.model_max_length,
        padding_side=teacher_tokenizer.padding_side,
        **roles,
    )
    tokenizer.chat_template = teacher_tokenizer.chat_template
    log.info(
        "trained a byte-level BPE vocabulary of %d tokens (%d special)", len(tokenizer), len(ids)
    )
    return tokenizer


def load_vocabulary(
    path: str,
    teacher_tokenizer: PreTrainedTokenizerBase,
    teacher_name: str = "teacher",
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """The user's tokenizer at ``path``; it and the teacher's must be byte-level BPE (else one
    line naming both). Without a chat template of its own it takes the teacher's when it holds
    every token the teacher adds."""
    tokenizer = load_tokenizer(path, trust_remote_code)
    check_tokenizer_pair(teacher_tokenizer, tokenizer, teacher_name, path)
    vocab = tokenizer.get_vocab()
    holds_markers = all(marker in vocab for marker in _added_tokens(teacher_tokenizer))
    if tokenizer.chat_template is None and teacher_tokenizer.chat_template and holds_markers:
        tokenizer.chat_template = teacher_tokenizer.chat_template
    return tokenizer


def _vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Rows needed for every id of the tokenizer (ids may leave holes)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def row_sources(
    teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> list[list[int]]:
    """For each student token id, the teacher token ids whose rows initialise it: one id when its
    string is in the teacher's vocabulary (copied), else the teacher's tokenisation of its bytes
    (averaged), empty when there is no such token (see the module doc). Both tokenizers must be
    byte-level BPE (checked: one line naming the one that is not)."""
    check_byte_level(teacher_tokenizer, "the teacher")
    check_byte_level(student_tokenizer, "the student")
    teacher_vocab = teacher_tokenizer.get_vocab()
    teacher_bpe = teacher_tokenizer.backend_tokenizer.model
    added = {token.content for token in student_tokenizer.added_tokens_decoder.values()}
    sources: list[list[int]] = [[] for _ in range(_vocab_size(student_tokenizer))]
    for token, index in student_tokenizer.get_vocab().items():
        if token in teacher_vocab:
            sources[index] = [teacher_vocab[token]]
            continue
        # An added token is its text; any other token is already in byte-level characters.
        written = byte_level_string(token.encode("utf-8")) if token in added else token
        sources[index] = [piece.id for piece in teacher_bpe.tokenize(written)]
    return sources


def initial_rows(teacher_rows: torch.Tensor, sources: list[list[int]]) -> torch.Tensor:
    """``[len(sources), H]`` float64 rows: row ``j`` is the mean of ``teacher_rows[sources[j]]``
    (``teacher_rows`` ``[V_teacher, H]``), or of all teacher rows when ``sources[j]`` is empty."""
    table = teacher_rows.detach().double().cpu()
    counts = torch.tensor([len(ids) for ids in sources])
    flat = torch.tensor([i for ids in sources for i in ids], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(sources)), counts)
    sums = torch.zeros(len(sources), table.shape[1], dtype=torch.float64)
    sums.index_add_(0, owner, table[flat])
    rows = sums / counts.clamp(min=1).double()[:, None]
    rows[counts == 0] = table.mean(dim=0)
    return rows


def resize_vocabulary(
    model: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
) -> dict[str, int]:
    """Give ``model`` (built from the teacher's layers, on the teacher's vocabulary) the rows of
    ``student_tokenizer``'s vocabulary, in place: embedding and (untied) head rows from the
    teacher's as the module doc says; the special token ids of its config follow the new
    tokenizer. Returns ``{copied, averaged, fallback}`` token counts."""
    sources = row_sources(teacher_tokenizer, student_tokenizer)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == embedding.data_ptr()
    new_embedding = initial_rows(embedding, sources)  # (V_student, H)
    new_head = None if tied else initial_rows(head, sources)
    model.resize_token_embeddings(len(sources), mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.copy_(new_embedding.to(weight.dtype))
        if new_head is not None:
            head_weight = model.get_output_embeddings().weight
            head_weight.copy_(new_head.to(head_weight.dtype))
    generation = getattr(model, "generation_config", None)
    for role in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(student_tokenizer, role)
        setattr(model.config, role, value)
        if generation is not None:
            setattr(generation, role, value)
    counts = [len(ids) for ids in sources]
    stats = {
        "copied": sum(1 for n in counts if n == 1),
        "averaged": sum(1 for n in counts if n > 1),
        "fallback": sum(1 for n in counts if n == 0),
    }
    log.info(
        "new vocabulary of %d tokens: %d rows copied from the teacher, %d averaged over the "
        "teacher's tokenisation, %d the mean of all teacher rows",
        len(sources),
        stats["copied"],
        stats["averaged"],
        stats["fallback"],
    )
    return stats
