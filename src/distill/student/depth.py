"""Students from a subset of the teacher's decoder layers (depth pruning by layer keeping)."""

from __future__ import annotations

import copy
import re

from transformers import AutoModelForCausalLM, PreTrainedModel

from distill.config import StudentConfig
from distill.errors import ModelError

__all__ = ["SUPPORTED_MODEL_TYPES", "check_supported", "select_layers", "build_student"]

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# Decoder-only families whose layers are self-contained ``model.layers.N`` blocks with
# q/k/v/o attention projections and a gate/up/down MLP (SmolLM is a Llama).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_supported(model: PreTrainedModel, what: str) -> None:
    """Raise :class:`ModelError` naming the architecture when ``what`` cannot handle it."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{what} supports the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}), not "
            f"model_type '{model_type}' ({type(model).__name__}); set student.path to an "
            "existing student instead"
        )


def select_layers(num_layers: int, config: StudentConfig) -> list[int]:
    """Teacher layer indices the student keeps, sorted, per the config's fixed recipe.

    Searched recipes (``student.search``) need calibration data: see
    :func:`distill.student.search.search_layers`.
    """
    if config.layers is not None:
        chosen = []
        for index in config.layers:
            resolved = index + num_layers if index < 0 else index
            if not 0 <= resolved < num_layers:
                raise ModelError(
                    f"student.layers: index {index} is out of range for a teacher with "
                    f"{num_layers} layers"
                )
            chosen.append(resolved)
        if len(set(chosen)) != len(chosen):
            raise ModelError(f"student.layers: repeated layer in {config.layers}")
        return sorted(chosen)
    if config.every_k is not None:
        return list(range(0, num_layers, config.every_k))
    if config.keep_first + config.keep_last > num_layers:
        raise ModelError(
            f"student.keep_first + student.keep_last = {config.keep_first + config.keep_last} "
            f"exceeds the teacher's {num_layers} layers"
        )
    first = list(range(config.keep_first))
    last = list(range(num_layers - config.keep_last, num_layers))
    return first + last


def build_student(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A new model of the teacher's architecture with only ``layers``, initialised from them.

    Embeddings, final norm and output head are copied; student layer ``i`` is teacher layer
    ``layers[i]``. The teacher is not modified.
    """
    teacher_state = teacher.state_dict()
    if not any(_LAYER_KEY.match(key) for key in teacher_state):
        raise ModelError(
            f"cannot drop layers of a {type(teacher).__name__}: expected decoder layers under "
            "'model.layers.N' (Llama-family architectures)"
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers]
    new_index = {old: new for new, old in enumerate(layers)}
    student_state = {}
    for key, tensor in teacher_state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            student_state[key] = tensor.clone()
            continue
        old = int(match.group(1))
        if old in new_index:
            student_state[f"model.layers.{new_index[old]}.{match.group(2)}"] = tensor.clone()
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.load_state_dict(student_state, strict=True)
    return student
