"""``distill student``: build a student from a config, save it, and compare its cost with the
teacher's (parameters, float32 weight bytes, forward FLOPs per token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import RunConfig
from distill.data import check_data_source
from distill.errors import ConfigError
from distill.io import atomic_directory
from distill.pipelines.run_models import prepare_models
from distill.student.build import model_cost

__all__ = ["write_student", "format_costs"]


def write_student(config: RunConfig, out: str | Path) -> dict[str, Any]:
    """Build the student ``config.student`` describes, save it with its tokenizer (the
    teacher's, or its own with ``student.tokenizer``) to ``out``, and return ``{teacher,
    student: cost, layers, vocabulary}``."""

    if config.student.path is not None:
        raise ConfigError("distill student builds a student: unset student.path")
    check_data_source(config)
    teacher = config.teacher.model_copy(update={"cache": None})  # the weights are needed
    models = prepare_models(config.model_copy(update={"teacher": teacher}), training=False)
    context = config.data.block_size
    result = {
        "teacher": model_cost(models.teacher, context),
        "student": model_cost(models.student, context),
        "layers": models.layers,
        "context": context,
        "vocabulary": {
            "teacher": len(models.tokenizer),
            "student": len(models.student_tokenizer or models.tokenizer),
        },
    }
    with atomic_directory(Path(out)) as tmp:
        models.student.save_pretrained(tmp, safe_serialization=True)
        (models.student_tokenizer or models.tokenizer).save_pretrained(tmp)
    return result


def format_costs(result: dict[str, Any]) -> str:
    """A three-row table: teacher, student, and student / teacher."""
    teacher, student = result["teacher"], result["student"]
    rows = [("", "params", "bytes", f"FLOPs/token @ {result['context']}")]
    for name, cost in (("teacher", teacher), ("student", student)):
        rows.append(
            (name, f"{cost['params']:,}", f"{cost['bytes']:,}", f"{cost['flops_per_token']:.3e}")
        )
    ratios = [f"{student[k] / teacher[k]:.3f}" for k in ("params", "bytes", "flops_per_token")]
    rows.append(("student/teacher", *ratios))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    text = "\n".join(lines) + f"\nstudent layers (teacher indices): {result['layers']}\n"
    vocabulary = result.get("vocabulary", {})
    if vocabulary and vocabulary["student"] != vocabulary["teacher"]:
        text += (
            f"student vocabulary: {vocabulary['student']} tokens of its own "
            f"(teacher {vocabulary['teacher']})\n"
        )
    return text
