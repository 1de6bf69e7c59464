"""The models every causal-LM job starts from: the teacher's tokenizer and (when needed) its
weights, the student loaded or built from the teacher, and the checks that they share a
vocabulary, or the preparation of a run across tokenizers."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config import RunConfig, TeacherConfig
from distill.data import Examples
from distill.data.alignment import check_byte_level, check_tokenizer_pair
from distill.errors import ModelError
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
from distill.pipelines.training_data import corpus_training_texts, prepare_data
from distill.student import calibration_blocks, make_student, needs_calibration
from distill.student.vocab import build_vocabulary, load_vocabulary, resize_vocabulary
from distill.teacher.cache import read_manifest
from distill.teacher.remote import RemoteTeacher

__all__ = [
    "Models",
    "cross_tokenizer_mode",
    "is_reference_teacher",
    "prepare_models",
    "resolve_student_tokenizer",
]


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


def is_reference_teacher(config: RunConfig, entry: TeacherConfig) -> bool:
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
        elsewhere = not any(is_reference_teacher(config, entry) for entry in config.teachers)
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
