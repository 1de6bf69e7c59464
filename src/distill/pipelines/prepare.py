"""What every causal-LM job prepares first: the teacher and student models, and the data; with
``teachers:``, each named teacher opened and checked against the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import NamedTeacherConfig, RunConfig, TeacherConfig
from distill.data import (
    Examples,
    Routing,
    default_documents,
    pack_documents,
    read_documents,
)
from distill.data.alignment import check_byte_level, check_tokenizer_pair
from distill.data.corpus import read_routed_documents, split_by_hash, split_documents
from distill.data.cross_examples import encode_cross_examples
from distill.data.cross_tokenizer import TokenizerPair
from distill.data.examples import detect_format, encode_examples, read_rows, split_rows
from distill.data.routing import pack_routed
from distill.data.shards import open_run_shards
from distill.errors import ModelError
from distill.evaluate.fidelity import block_prompt_tokens
from distill.models import (
    load_causal_lm,
    load_teacher,
    load_teacher_tokenizer,
    load_tokenizer,
    same_vocabulary,
    shared_vocab_rows,
    teacher_source,
    tokenizer_rows,
)
from distill.student import calibration_blocks, make_student, needs_calibration
from distill.student.vocab import build_vocabulary, load_vocabulary, resize_vocabulary
from distill.teacher import LiveTeacher, NamedTeacher, TeacherSet
from distill.teacher.cache import (
    MANIFEST,
    open_run_cache,
    read_manifest,
    sha256_file,
    weights_sha256,
)
from distill.teacher.remote import RemoteTeacher

__all__ = [
    "Models",
    "TrainingData",
    "cross_tokenizer_mode",
    "prepare_cross_data",
    "prepare_models",
    "resolve_student_tokenizer",
    "prepare_data",
    "prepare_sources",
    "prepare_training_data",
    "prepare_teachers",
    "split_texts",
    "corpus_training_texts",
]

log = logging.getLogger(__name__)


@dataclass
class Models:
    teacher: PreTrainedModel | None  # None while training from a teacher cache or server
    student: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # the teacher's
    vocab_rows: int  # rows both share; across tokenizers, the student's own rows
    teacher_source: str
    layers: list[int] | None = None  # teacher layer each student layer was built from
    remote: RemoteTeacher | None = None  # teacher.url: the served teacher, checked
    # A cross-tokenizer run (loss.cross_tokenizer, a student with a tokenizer of its own): the
    # student's tokenizer and the teacher's own output rows. None: one shared ``tokenizer``.
    student_tokenizer: PreTrainedTokenizerBase | None = None
    teacher_rows: int | None = None

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the run trains across tokenizers (aligned on bytes, or labels only)."""
        return self.student_tokenizer is not None

    @property
    def new_vocabulary(self) -> bool:
        """Whether the student's vocabulary differs from the teacher's (no token-level metrics
        then: they compare rows of one vocabulary)."""
        own = self.student_tokenizer
        return own is not None and not same_vocabulary(self.tokenizer, own)


def _split_file_texts(
    path: str, data_format: str, text_field: str, heldout_fraction: float
) -> tuple[list[str], list[str]]:
    """(train, held-out) text of one file in ``data_format``: documents, or each chat /
    prompt-response row's messages joined by newlines, split as its blocks are."""
    if data_format == "text":
        return split_documents(read_documents(path, text_field), heldout_fraction)
    parts = split_rows(read_rows(path), heldout_fraction)
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


def split_texts(config: RunConfig) -> tuple[list[str], list[str]]:
    """(train, held-out) text of ``data``, split as the blocks are. With ``data.sources``, each
    source is split on its own (in its own format); the held-out documents take every source's
    in turn."""
    fraction = config.data.heldout_fraction
    if config.data.sources:
        splits = [
            _split_file_texts(source.path, source.format, source.text_field, fraction)
            for source in config.data.sources
        ]
        held = [
            part[i]
            for i in range(max(len(h) for _, h in splits))
            for _, part in splits
            if i < len(part)
        ]
        return [document for train, _ in splits for document in train], held
    if config.data.path is None:
        return split_documents(default_documents(), fraction)
    data_format = detect_format(config.data.path, config.data.format)
    return _split_file_texts(config.data.path, data_format, config.data.text_field, fraction)


def corpus_training_texts(config: RunConfig) -> list[str]:
    """The training split's text (never the held-out part): what a new student vocabulary is
    trained on."""
    return split_texts(config)[0]


def resolve_student_tokenizer(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, source: str
) -> tuple[PreTrainedTokenizerBase, str]:
    """The student's tokenizer and how errors name it, before any weights load:
    ``student.tokenizer``'s (given, or trained on the training split; refused with one line
    unless it and the teacher's are byte-level BPE), a ``student.path`` model's own, else the
    teacher's."""
    wanted = config.student.tokenizer
    trust = config.teacher.trust_remote_code
    if wanted.path is not None:
        return load_vocabulary(wanted.path, tokenizer, source, trust), wanted.path
    if wanted.train_vocab is not None:
        check_byte_level(tokenizer, f"teacher {source}")
        trained = build_vocabulary(corpus_training_texts(config), wanted.train_vocab, tokenizer)
        return trained, f"student.tokenizer.train_vocab={wanted.train_vocab}"
    if config.student.path is not None:
        return load_tokenizer(config.student.path, trust), config.student.path
    return tokenizer, "student"


def _labels_only(config: RunConfig) -> bool:
    return config.loss.alpha == 1.0 and config.loss.alpha_schedule == "constant"


def cross_tokenizer_mode(
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    student_name: str,
    training: bool = True,
) -> bool:
    """Whether this run trains across tokenizers, decided from the two tokenizers alone (before
    any weights load): ``loss.cross_tokenizer`` is set, or the tokenizers differ. ``training``:
    tokenizers that differ need ``loss.cross_tokenizer`` or labels only (sequence-level KD on
    text the teacher wrote) and the live teacher, and an aligned pair byte-level BPE on both
    sides; each refusal is one line naming both."""
    differ = not same_vocabulary(tokenizer, student_tokenizer)
    if config.loss.cross_tokenizer is None and not differ:
        return False
    if not training:  # distill student: built, not trained
        return True
    teacher_name = teacher_source(config.teacher)
    if config.loss.cross_tokenizer is None and not _labels_only(config):
        raise ModelError(
            f"tokenizers differ: teacher {teacher_name} has {len(tokenizer)} tokens, student "
            f"{student_name} {len(student_tokenizer)}: set loss.cross_tokenizer=uld or hybrid "
            "(docs/cross-tokenizer.md), or loss.alpha=1 (labels only, e.g. on `distill "
            "generate` output)"
        )
    unset = "teacher.url" if config.teacher.url else None
    if config.teacher.cache and config.loss.cross_tokenizer is None:
        unset = "teacher.cache"  # a cache across tokenizers holds a cross-tokenizer run's rows
    if unset:
        raise ModelError(
            f"teacher {teacher_name} and student {student_name} tokenize differently: train "
            f"with the live teacher (unset {unset})"
        )
    if not _labels_only(config):
        check_tokenizer_pair(tokenizer, student_tokenizer, teacher_name, student_name)
    return True


def _is_reference(config: RunConfig, entry: TeacherConfig) -> bool:
    """Whether ``entry`` (one of ``teachers:``) is the live model of ``teacher:`` itself."""
    reference = config.teacher
    return (
        not entry.url
        and not entry.cache
        and teacher_source(entry) == teacher_source(reference)
        and (entry.dtype, entry.trust_remote_code) == (reference.dtype, reference.trust_remote_code)
    )


def prepare_models(config: RunConfig, *, training: bool = True) -> Models:
    """Load the teacher, then load or build the student, and check they share a tokenizer, or
    prepare a cross-tokenizer run (:func:`cross_tokenizer_mode`; ``training`` False: a student
    built, not trained, as ``distill student`` does).

    With ``teachers:``, the teacher of ``teacher:`` (the tokenizer, the student's layers, the
    evaluation teacher) is kept loaded only when one of them is that very model."""
    source = teacher_source(config.teacher)
    tokenizer = load_teacher_tokenizer(config.teacher)
    student_tokenizer, student_name = resolve_student_tokenizer(config, tokenizer, source)
    if cross_tokenizer_mode(config, tokenizer, student_tokenizer, student_name, training):
        return _prepare_cross_models(config, tokenizer, student_tokenizer, student_name)
    remote, served_rows = None, None
    if config.teacher.url:  # asked first: an unreachable or other server stops the job here
        remote = RemoteTeacher.from_config(config.teacher, vocab_rows=len(tokenizer))
        served_rows = remote.check_server(teacher_rows=None, tokens=len(tokenizer)).vocab_size
    # From a cache or a server, the teacher's weights are needed only to build a student.
    if config.teachers is None:
        elsewhere = bool(config.teacher.cache or config.teacher.url)
    else:
        elsewhere = not any(_is_reference(config, entry) for entry in config.teachers)
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
    """A cross-tokenizer run's models: the live teacher, and the student of ``student.path`` or
    one built from the teacher's layers (with ``student.tokenizer``, its embedding and head
    rows moved onto its own vocabulary, initialised from the teacher's). With
    ``teacher.cache`` the teacher is loaded only to build a student, then freed (loaded again
    to evaluate); its rows are its tokenizer's (checked against the cache)."""
    source = teacher_source(config.teacher)
    cached = bool(config.teacher.cache)
    teacher = None if cached and config.student.path else load_teacher(config.teacher)
    student, layers = _student_model(config, teacher, tokenizer)
    if config.student.tokenizer.new_vocabulary:
        resize_vocabulary(student, tokenizer, student_tokenizer)
    teacher_rows = len(tokenizer) if teacher is None else tokenizer_rows(teacher, tokenizer, source)
    return Models(
        None if cached else teacher,
        student,
        tokenizer,
        tokenizer_rows(student, student_tokenizer, student_name),
        source,
        layers,
        student_tokenizer=student_tokenizer,
        teacher_rows=teacher_rows,
    )


def prepare_cross_data(
    config: RunConfig, pair: TokenizerPair | None, student_tokenizer: PreTrainedTokenizerBase
) -> tuple[Any, Any]:
    """A cross-tokenizer run's (training data, held-out data) in the student's tokenization:
    packed blocks (a list of them per source with ``data.sources``), or chat / prompt-response
    rows, encoded for both tokenizers when the teacher is used (``pair``), for the student
    alone otherwise."""
    if config.data.sources:
        return prepare_sources(config, student_tokenizer)
    data_format = detect_format(config.data.path, config.data.format)
    if data_format == "text" or pair is None:
        return prepare_data(config, student_tokenizer)
    rows = read_rows(config.data.path)
    train_rows, heldout_rows = split_rows(rows, config.data.heldout_fraction)
    block_size, source = config.data.block_size, str(config.data.path)
    train = encode_cross_examples(train_rows, data_format, pair, block_size, source)
    heldout = encode_examples(heldout_rows, data_format, student_tokenizer, block_size, source)
    return train, heldout.head(config.eval.max_blocks)


@dataclass
class TrainingData:
    """A run's data: ``train`` and ``heldout`` packed text blocks ``[n, block_size]`` (with
    ``data.sources``: every source's training rows concatenated, ``parts`` each one's) or
    encoded chat / prompt-response :class:`Examples` (also every source's, when one of
    ``data.sources`` is chat or prompt-response). With ``teachers:``, ``routes`` ``[n]`` is
    each training row's teacher (Examples also carry theirs); the held-out rows are not routed."""

    train: torch.Tensor | Examples
    heldout: torch.Tensor | Examples
    parts: list[torch.Tensor] | list[Examples] | None = None
    routes: torch.Tensor | None = None


def _pack_train(
    documents: list[str], routes: list[int] | None, routing: Routing | None, tokenizer, size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training blocks (and routes): one teacher's as :func:`pack_documents`, several's per
    teacher (:func:`pack_routed`)."""
    if routing is None or routes is None:
        return pack_documents(documents, tokenizer, size), None
    return pack_routed(documents, routes, routing, tokenizer, size)


def _read_split_pack(
    path: str | None, text_field: str, config: RunConfig, tokenizer, routing: Routing | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(train blocks, held-out blocks, train routes) of one text source (None: the default
    corpus); whole documents held out by content hash, as :func:`split_documents`."""
    size, fraction = config.data.block_size, config.data.heldout_fraction
    if routing is None:
        documents = default_documents() if path is None else read_documents(path, text_field)
        routes = None
    elif path is None:
        documents = default_documents()
        routes = [routing.default_index] * len(documents)
    else:
        documents, routes = read_routed_documents(path, text_field, routing)
    train, held = split_by_hash(documents, fraction, [len(doc) for doc in documents])
    train_routes = None if routes is None else [routes[i] for i in train]
    train_blocks, block_routes = _pack_train(
        [documents[i] for i in train], train_routes, routing, tokenizer, size
    )
    heldout_blocks = pack_documents([documents[i] for i in held], tokenizer, size)
    return train_blocks, heldout_blocks, block_routes


def prepare_training_data(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    """The run's :class:`TrainingData` (``data.format``, ``data.sources``, ``teachers:``,
    ``data.shards``: memory-mapped :class:`~distill.data.shards.TokenBlocks` for training)."""
    if config.data.shards:  # tokenized once by `distill data prepare`, checked, read on demand
        return TrainingData(*open_run_shards(config, tokenizer))
    routing = Routing.from_config(config)
    if config.data.sources:  # each source split on its own; held-out rows taken in turn
        return _prepare_sources(config, tokenizer, routing)
    data_format = detect_format(config.data.path, config.data.format)
    if data_format != "text":
        assert config.data.path is not None  # detect_format finds rows only in a file
        train, heldout = _read_split_examples(
            config.data.path, data_format, config, tokenizer, routing
        )
        return TrainingData(train, heldout.head(config.eval.max_blocks), routes=train.teachers)
    train, heldout, routes = _read_split_pack(
        config.data.path, config.data.text_field, config, tokenizer, routing
    )
    return TrainingData(train, heldout[: config.eval.max_blocks], routes=routes)


def _read_split_examples(
    path: str, data_format: str, config: RunConfig, tokenizer, routing: Routing | None
) -> tuple[Examples, Examples]:
    """(train, held-out) examples of one chat / prompt-response .jsonl file; whole rows held
    out by content hash (:func:`split_rows`)."""
    rows = read_rows(path)
    train_rows, heldout_rows = split_rows(rows, config.data.heldout_fraction)
    block_size = config.data.block_size
    train = encode_examples(train_rows, data_format, tokenizer, block_size, str(path), routing)
    heldout = encode_examples(heldout_rows, data_format, tokenizer, block_size, str(path))
    return train, heldout


def _prepare_sources(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase, routing: Routing | None
) -> TrainingData:
    """``data.sources``: each source read in its own format and split on its own; the held-out
    rows take every source's in turn, up to ``eval.max_blocks``. All text: packed blocks; with
    a chat / prompt-response source, every source as :class:`Examples` (text blocks as rows
    whose every next token is a target), so one batch can hold rows of every format."""
    splits = []
    for source in config.data.sources or []:
        if source.format == "text":
            splits.append(
                _read_split_pack(source.path, source.text_field, config, tokenizer, routing)
            )
        else:
            train, heldout = _read_split_examples(
                source.path, source.format, config, tokenizer, routing
            )
            splits.append((train, heldout, train.teachers))
    examples = any(isinstance(train, Examples) for train, _, _ in splits)
    if examples:  # prompts as the loop (on-policy) and the evaluation's samples take them
        train_prompt = config.onpolicy.prompt_tokens if config.onpolicy.lambda_ > 0 else 1
        heldout_prompt = block_prompt_tokens(config.data.block_size)
        splits = [
            (train, heldout, routes)
            if isinstance(train, Examples)
            else (
                Examples.from_blocks(train, train_prompt, routes),
                Examples.from_blocks(heldout, heldout_prompt),
                routes,
            )
            for train, heldout, routes in splits
        ]
    parts = [train for train, _, _ in splits]
    held = [heldout for _, heldout, _ in splits]
    offsets = [sum(len(h) for h in held[:p]) for p in range(len(held))]
    in_turn = [
        offsets[p] + i
        for i in range(max(len(h) for h in held))
        for p in range(len(held))
        if i < len(held[p])
    ]
    rows = torch.tensor(in_turn[: config.eval.max_blocks])
    if examples:
        train = Examples.cat(parts)
        return TrainingData(train, Examples.cat(held).select(rows), parts, train.teachers)
    routes = None if routing is None else torch.cat([r for _, _, r in splits])
    return TrainingData(torch.cat(parts), torch.cat(held)[rows], parts, routes)


def prepare_sources(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``data.sources``: (each source's training blocks, held-out blocks). Every source is split
    on its own; the held-out blocks take every source's in turn, up to ``eval.max_blocks``."""
    assert config.data.sources
    data = prepare_training_data(config, tokenizer)
    assert data.parts is not None
    return data.parts, data.heldout


def prepare_data(
    config: RunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor] | tuple[Examples, Examples]:
    """(train, heldout): packed text blocks ``[n, block_size]``, or encoded chat /
    prompt-response :class:`Examples` (``data.format``). With ``data.sources``, the training
    blocks of every source concatenated (see :func:`prepare_sources`); with ``teachers:``,
    packed per teacher (see :func:`prepare_training_data`)."""
    data = prepare_training_data(config, tokenizer)
    return data.train, data.heldout


def _live_member(
    config: RunConfig, entry: NamedTeacherConfig, models: Models, device: torch.device
) -> NamedTeacher:
    """A live teacher: the model of ``teacher:`` when it is that one, else loaded; its tokenizer
    and output rows must cover the run's vocabulary."""
    source = teacher_source(entry)
    if _is_reference(config, entry) and models.teacher is not None:
        model = models.teacher
    else:
        shared_vocab_rows(
            load_teacher_tokenizer(entry),
            models.tokenizer,
            models.vocab_rows,
            models.vocab_rows,
            teacher_name=f"teacher {entry.name} ({source})",
            student_name="the run's tokenizer",
        )
        model = load_teacher(entry).to(device)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < models.vocab_rows:
        raise ModelError(
            f"teacher {entry.name} ({source}) has {rows} output rows, fewer than the student's "
            f"{models.vocab_rows}: every teacher must share the student's vocabulary"
        )
    teacher = LiveTeacher(model, models.vocab_rows)
    return NamedTeacher(entry.name, teacher, "live", source, weights_sha256(source))


def _served_member(entry: NamedTeacherConfig, models: Models) -> NamedTeacher:
    """A served teacher, asked what it serves (its vocabulary must cover the run's)."""
    remote = RemoteTeacher.from_config(entry, vocab_rows=models.vocab_rows)
    info = remote.check_server(teacher_rows=None, tokens=len(models.tokenizer))
    if entry.path is not None:  # its tokenizer, when named, must be the run's
        shared_vocab_rows(
            load_teacher_tokenizer(entry),
            models.tokenizer,
            models.vocab_rows,
            models.vocab_rows,
            teacher_name=f"teacher {entry.name} ({entry.path})",
            student_name="the run's tokenizer",
        )
    fingerprint = f"{remote.model or ','.join(info.models)}; vocab {info.vocab_size}"
    return NamedTeacher(entry.name, remote, "url", remote.url, fingerprint)


def prepare_teachers(
    config: RunConfig, models: Models, data: TrainingData, device: torch.device
) -> TeacherSet:
    """``teachers:``: each named teacher opened and checked against the run, before training.

    Live teachers are loaded (the model of ``teacher:`` is shared, not loaded twice); served
    ones are asked what they serve; caches are checked (:func:`open_run_cache`) against the
    training blocks routed to them, as ``distill cache --teacher NAME`` writes them. Every one
    must share the student's vocabulary (a :class:`ModelError` or a cache / server error).
    """
    assert config.teachers is not None
    routing = Routing.from_config(config)
    assert routing is not None and data.routes is not None
    members = []
    for index, entry in enumerate(config.teachers):
        own_rows = int((data.routes == index).sum())
        if own_rows == 0:
            log.warning("teacher %s: no training row is routed to it", entry.name)
        if entry.url:
            members.append(_served_member(entry, models))
        elif entry.cache:
            blocks = data.train[data.routes == index]  # text blocks: the schema refuses examples
            cache = open_run_cache(
                config,
                teacher_source=teacher_source(entry),
                tokenizer=models.tokenizer,
                train_blocks=blocks,
                vocab_rows=models.vocab_rows,
                teacher=entry,
            )
            fingerprint = sha256_file(cache.directory / MANIFEST)
            members.append(NamedTeacher(entry.name, cache, "cache", str(entry.cache), fingerprint))
        else:
            members.append(_live_member(config, entry, models, device))
    return TeacherSet(members, routing.default)
