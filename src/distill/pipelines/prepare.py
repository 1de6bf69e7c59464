"""What every causal-LM job prepares first: the teacher and student models, and the data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import RunConfig
from distill.data import (
    Examples,
    default_documents,
    pack_documents,
    read_documents,
    split_documents,
)
from distill.data.examples import detect_format, encode_examples, read_rows, split_rows
from distill.models import (
    check_byte_level,
    load_causal_lm,
    load_teacher,
    load_teacher_tokenizer,
    load_tokenizer,
    same_vocabulary,
    shared_vocab_rows,
    teacher_source,
)
from distill.student import calibration_blocks, make_student, needs_calibration
from distill.student.vocab import load_vocabulary, resize_vocabulary, train_vocabulary
from distill.teacher.cache import read_manifest
from distill.teacher.remote import RemoteTeacher

__all__ = [
    "Models",
    "prepare_models",
    "prepare_data",
    "prepare_sources",
    "split_texts",
    "training_texts",
]


@dataclass
class Models:
    teacher: PreTrainedModel | None  # None while training from a teacher cache or server
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # the teacher's
    vocab_rows: int  # rows both share; the teacher's rows when the vocabularies differ
    teacher_source: str
    layers: list[int] | None = None  # teacher layer each student layer was built from
    remote: RemoteTeacher | None = None  # teacher.url: the served teacher, checked
    student_tokenizer: PreTrainedTokenizerBase | None = None  # None: the teacher's

    @property
    def new_vocabulary(self) -> bool:
        """Whether the student's vocabulary differs from the teacher's (student.tokenizer)."""
        own = self.student_tokenizer
        return own is not None and not same_vocabulary(self.tokenizer, own)


def split_texts(config: RunConfig) -> tuple[list[str], list[str]]:
    """(train, held-out) text of ``data``, split as the blocks are: documents, or each chat /
    prompt-response row's messages joined by newlines. With ``data.sources``, each source is
    split on its own; the held-out documents take every source's in turn."""
    if config.data.sources:
        splits = [
            split_documents(
                read_documents(source.path, source.text_field), config.data.heldout_fraction
            )
            for source in config.data.sources
        ]
        held = [
            part[i]
            for i in range(max(len(h) for _, h in splits))
            for _, part in splits
            if i < len(part)
        ]
        return [document for train, _ in splits for document in train], held
    data_format = detect_format(config.data.path, config.data.format)
    if data_format != "text":
        assert config.data.path is not None  # detect_format finds rows only in a file
        parts = split_rows(read_rows(config.data.path), config.data.heldout_fraction)
        if data_format == "chat":
            joined = [
                [
                    "\n".join(str(m.get("content", "")) for m in row.get("messages") or [])
                    for row in rows
                ]
                for rows in parts
            ]
        else:
            joined = [
                [f"{row.get('prompt', '')}\n{row.get('response', '')}" for row in rows]
                for rows in parts
            ]
        return joined[0], joined[1]
    if config.data.path is None:
        documents = default_documents()
    else:
        documents = read_documents(config.data.path, config.data.text_field)
    return split_documents(documents, config.data.heldout_fraction)


def training_texts(config: RunConfig) -> list[str]:
    """The training split's text (never the held-out part): what a new student vocabulary is
    trained on."""
    return split_texts(config)[0]


def _student_vocabulary(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, source: str
) -> PreTrainedTokenizerBase:
    """``student.tokenizer``'s tokenizer, checked against the teacher's before any model loads
    (an unsupported pair: one line naming both)."""
    wanted = config.student.tokenizer
    if wanted.path is not None:
        return load_vocabulary(wanted.path, tokenizer, source, config.teacher.trust_remote_code)
    check_byte_level(tokenizer, f"teacher {source}")
    assert wanted.train_vocab is not None
    return train_vocabulary(training_texts(config), wanted.train_vocab, tokenizer)


def prepare_models(config: RunConfig) -> Models:
    """Load the teacher, then load or build the student, and check they share a tokenizer
    (or, with ``student.tokenizer``, give the built student a vocabulary of its own)."""
    source = teacher_source(config.teacher)
    tokenizer = load_teacher_tokenizer(config.teacher)
    new_tokenizer = None
    if config.student.tokenizer.new_vocabulary:  # before any weights load: it may be refused
        new_tokenizer = _student_vocabulary(config, tokenizer, source)
    remote, served_rows = None, None
    if config.teacher.url:  # asked first: an unreachable or other server stops the job here
        remote = RemoteTeacher.from_config(config.teacher, vocab_rows=len(tokenizer))
        served_rows = remote.check_server(teacher_rows=None, tokens=len(tokenizer)).vocab_size
    # From a cache or a server, the teacher's weights are needed only to build a student.
    elsewhere = config.teacher.cache or config.teacher.url
    teacher = (
        None if elsewhere and config.student.path is not None else load_teacher(config.teacher)
    )
    if config.student.path is not None:
        student = load_causal_lm(
            config.student.path, config.teacher.dtype, config.teacher.trust_remote_code
        )
        student_tokenizer = load_tokenizer(config.student.path, config.teacher.trust_remote_code)
        student_name = config.student.path
    else:
        calibration = None
        if needs_calibration(config.student):  # a layer search or width pruning
            train_blocks = prepare_data(config, tokenizer)[0]
            if isinstance(train_blocks, Examples):  # padded rows; the padding is calibration too
                train_blocks = train_blocks.input_ids
            calibration = calibration_blocks(
                train_blocks, config.student.calibration_blocks, config.seed
            )
        built = make_student(teacher, config.student, calibration)
        student, layers = built.model, built.layers
        student_tokenizer, student_name = tokenizer, "student"
        if new_tokenizer is not None:
            resize_vocabulary(student, tokenizer, new_tokenizer)
            student_tokenizer = new_tokenizer
    student_rows = student.get_output_embeddings().weight.shape[0]
    if teacher is not None:
        teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    elif config.teacher.cache:
        teacher_rows = read_manifest(config.teacher.cache)["teacher"]["vocab_rows"]
    else:
        teacher_rows = served_rows or student_rows
    if remote is not None and teacher is not None:  # the server must serve this very teacher
        remote.check_server(teacher_rows=teacher_rows, tokens=len(tokenizer))
    if new_tokenizer is not None:  # two vocabularies: each model keeps its own rows
        vocab_rows = min(teacher_rows, len(tokenizer))
    else:
        vocab_rows = shared_vocab_rows(
            tokenizer,
            student_tokenizer,
            teacher_rows,
            student_rows,
            teacher_name=source,
            student_name=student_name,
        )
    if remote is not None:
        remote.vocab_rows = vocab_rows
    if elsewhere:  # freed before training; loaded again only for evaluation
        teacher = None
    origin = layers if config.student.path is None else None
    return Models(
        teacher, student, tokenizer, vocab_rows, source, origin, remote, student_tokenizer
    )


def prepare_sources(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``data.sources``: (each source's training blocks, held-out blocks). Every source is split
    on its own; the held-out blocks take every source's in turn, up to ``eval.max_blocks``."""
    assert config.data.sources
    parts, held = [], []
    for source in config.data.sources:
        documents = read_documents(source.path, source.text_field)
        train_docs, heldout_docs = split_documents(documents, config.data.heldout_fraction)
        parts.append(pack_documents(train_docs, tokenizer, config.data.block_size))
        held.append(pack_documents(heldout_docs, tokenizer, config.data.block_size))
    rows = [part[i] for i in range(max(len(h) for h in held)) for part in held if i < len(part)]
    return parts, torch.stack(rows[: config.eval.max_blocks])


def prepare_data(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor] | tuple[Examples, Examples]:
    """(train, heldout): packed text blocks ``[n, block_size]``, or encoded chat /
    prompt-response :class:`Examples` (``data.format``). With ``data.sources``, the training
    blocks of every source concatenated (see :func:`prepare_sources`)."""
    if config.data.sources:
        parts, heldout = prepare_sources(config, tokenizer)
        return torch.cat(parts), heldout
    data_format = detect_format(config.data.path, config.data.format)
    if data_format != "text":
        assert config.data.path is not None  # detect_format finds rows only in a file
        rows = read_rows(config.data.path)
        train_rows, heldout_rows = split_rows(rows, config.data.heldout_fraction)
        block_size, source = config.data.block_size, str(config.data.path)
        train = encode_examples(train_rows, data_format, tokenizer, block_size, source)
        heldout = encode_examples(heldout_rows, data_format, tokenizer, block_size, source)
        keep = config.eval.max_blocks
        heldout = Examples(
            heldout.input_ids[:keep],
            heldout.labels[:keep],
            heldout.lengths[:keep],
            heldout.prompt_lengths[:keep],
        )
        return train, heldout
    if config.data.path is None:
        documents = default_documents()
    else:
        documents = read_documents(config.data.path, config.data.text_field)
    train_docs, heldout_docs = split_documents(documents, config.data.heldout_fraction)
    train_blocks = pack_documents(train_docs, tokenizer, config.data.block_size)
    heldout_blocks = pack_documents(heldout_docs, tokenizer, config.data.block_size)
    return train_blocks, heldout_blocks[: config.eval.max_blocks]
