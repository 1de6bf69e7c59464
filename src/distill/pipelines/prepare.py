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
from distill.data.alignment import check_tokenizer_pair
from distill.data.examples import detect_format, encode_examples, read_rows, split_rows
from distill.errors import ModelError
from distill.models import (
    load_causal_lm,
    load_teacher,
    load_teacher_tokenizer,
    load_tokenizer,
    shared_vocab_rows,
    teacher_source,
    tokenizer_rows,
)
from distill.student import calibration_blocks, make_student, needs_calibration
from distill.teacher.cache import read_manifest
from distill.teacher.remote import RemoteTeacher

__all__ = [
    "Models",
    "cross_tokenizer_mode",
    "prepare_models",
    "prepare_data",
    "prepare_sources",
]


@dataclass
class Models:
    teacher: PreTrainedModel | None  # None while training from a teacher cache or server
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    vocab_rows: int
    teacher_source: str
    layers: list[int] | None = None  # teacher layer each student layer was built from
    remote: RemoteTeacher | None = None  # teacher.url: the served teacher, checked
    # Cross-tokenizer runs (loss.cross_tokenizer, or a student with its own tokenizer trained
    # on labels alone): the student's tokenizer and the teacher's output rows; vocab_rows is
    # then the student's. None: one shared tokenizer (``tokenizer``).
    student_tokenizer: PreTrainedTokenizerBase | None = None
    teacher_rows: int | None = None

    @property
    def cross_tokenizer(self) -> bool:
        return self.student_tokenizer is not None


def _labels_only(config: RunConfig) -> bool:
    return config.loss.alpha == 1.0 and config.loss.alpha_schedule == "constant"


def cross_tokenizer_mode(
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    student_name: str,
) -> bool:
    """Whether this run trains across tokenizers, decided from the two tokenizers alone (before
    any weights load): ``loss.cross_tokenizer`` is set, or the tokenizers differ and the run uses
    labels only (sequence-level KD on text the teacher wrote). Tokenizers that differ otherwise,
    or a pair without byte spans, are one line naming both."""
    teacher_name = teacher_source(config.teacher)
    differ = tokenizer.get_vocab() != student_tokenizer.get_vocab()
    if config.loss.cross_tokenizer is None and differ and not _labels_only(config):
        raise ModelError(
            f"tokenizers differ: teacher {teacher_name} has {len(tokenizer)} tokens, student "
            f"{student_name} {len(student_tokenizer)}: set loss.cross_tokenizer=uld or hybrid "
            "(docs/cross-tokenizer.md), or loss.alpha=1 (labels only, e.g. on `distill "
            "generate` output)"
        )
    if config.loss.cross_tokenizer is None and not differ:
        return False
    if config.teacher.cache or config.teacher.url:
        raise ModelError(
            f"teacher {teacher_name} and student {student_name} tokenize differently: train "
            "with the live teacher (unset teacher.cache / teacher.url)"
        )
    if not _labels_only(config):
        check_tokenizer_pair(tokenizer, student_tokenizer, teacher_name, student_name)
    return True


def prepare_models(config: RunConfig) -> Models:
    """Load the teacher, then load or build the student, and check they share a tokenizer."""
    source = teacher_source(config.teacher)
    tokenizer = load_teacher_tokenizer(config.teacher)
    student_tokenizer, student_name = tokenizer, "student"
    if config.student.path is not None:  # both tokenizers are checked before any weights load
        student_tokenizer = load_tokenizer(config.student.path, config.teacher.trust_remote_code)
        student_name = config.student.path
    if cross_tokenizer_mode(config, tokenizer, student_tokenizer, student_name):
        return _prepare_cross_models(config, tokenizer, student_tokenizer, student_name)
    remote, served_rows = None, None
    if config.teacher.url:  # asked first: an unreachable or other server stops the job here
        remote = RemoteTeacher.from_config(config.teacher, vocab_rows=len(tokenizer))
        served_rows = remote.check_server(teacher_rows=None, tokens=len(tokenizer)).vocab_size
    # From a cache or a server, the teacher's weights are needed only to build a student.
    elsewhere = config.teacher.cache or config.teacher.url
    teacher = (
        None if elsewhere and config.student.path is not None else load_teacher(config.teacher)
    )
    student, layers = _student_model(config, teacher, tokenizer)
    student_rows = student.get_output_embeddings().weight.shape[0]
    if teacher is not None:
        teacher_rows = teacher.get_output_embeddings().weight.shape[0]
    elif config.teacher.cache:
        teacher_rows = read_manifest(config.teacher.cache)["teacher"]["vocab_rows"]
    else:
        teacher_rows = served_rows or student_rows
    if remote is not None and teacher is not None:  # the server must serve this very teacher
        remote.check_server(teacher_rows=teacher_rows, tokens=len(tokenizer))
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
    return Models(teacher, student, tokenizer, vocab_rows, source, layers, remote)


def _student_model(
    config: RunConfig, teacher: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, list[int] | None]:
    """(the student of ``student.path``, None), or (one built from the teacher's layers, the
    teacher layer each student layer came from)."""
    if config.student.path is not None:
        student = load_causal_lm(
            config.student.path, config.teacher.dtype, config.teacher.trust_remote_code
        )
        return student, None
    calibration = None
    if needs_calibration(config.student):  # a layer search or width pruning
        train_blocks = prepare_data(config, tokenizer)[0]
        if isinstance(train_blocks, Examples):  # padded rows; the padding is calibration too
            train_blocks = train_blocks.input_ids
        calibration = calibration_blocks(
            train_blocks, config.student.calibration_blocks, config.seed
        )
    built = make_student(teacher, config.student, calibration)
    return built.model, built.layers


def _prepare_cross_models(
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    student_name: str,
) -> Models:
    """A cross-tokenizer run's models: the live teacher, and the student of ``student.path``
    (or built from the teacher's layers: then one tokenizer, aligned all the same)."""
    source = teacher_source(config.teacher)
    teacher = load_teacher(config.teacher)
    student, layers = _student_model(config, teacher, tokenizer)
    return Models(
        teacher,
        student,
        tokenizer,
        tokenizer_rows(student, student_tokenizer, student_name),
        source,
        layers,
        student_tokenizer=student_tokenizer,
        teacher_rows=tokenizer_rows(teacher, tokenizer, source),
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
