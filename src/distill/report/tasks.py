"""report.json and report.md of encoder and ``nn.Module`` runs (any metrics, retention)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.io import atomic_write_json, atomic_write_text, read_jsonl

__all__ = ["write_task_report"]


_HIGHER_IS_BETTER = {
    "accuracy",
    "macro_f1",
    "top1_agreement",
    "cosine_to_teacher",
    "retrieval_agreement",
    "items_per_s",
    "texts_per_s",
}


def _retention(models: dict[str, dict[str, Any]]) -> dict[str, float]:
    """student_after / teacher for every higher-is-better metric both have (teacher = 1)."""
    teacher, after = models.get("teacher"), models.get("student_after")
    if teacher is None or after is None:
        return {}
    return {
        key: after[key] / teacher[key]
        for key in teacher
        if key in _HIGHER_IS_BETTER and key in after and teacher[key]
    }


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value > 999):
        return f"{value:,.0f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_task_report(run_dir: str | Path, title: str) -> dict[str, Any]:
    """report.json and report.md from ``evaluation.json`` and ``metrics.jsonl`` of a run folder.

    ``report["models"]`` maps teacher / student_before / student_after (and any other compared
    model) to their metrics; ``report["retention"]`` is student_after / teacher per
    higher-is-better metric.
    """
    run_path = Path(run_dir)
    evaluation = json.loads((run_path / "evaluation.json").read_text())
    history = read_jsonl(run_path / "metrics.jsonl")
    models = evaluation["models"]
    last = history[-1] if history else {}
    report = {
        "run": {"dir": str(run_path), "title": title},
        "models": models,
        "retention": _retention(models),
        "training": {
            "steps": last.get("step", 0),
            "items_per_step": last.get("items", 0),
            "train_seconds": last.get("elapsed_s", 0.0),
            "final_loss": last.get("loss"),
        },
        **{key: value for key, value in evaluation.items() if key != "models"},
    }
    keys = list(dict.fromkeys(key for metrics in models.values() for key in metrics))
    lines = [
        f"# distill report: {title}",
        "",
        "| model | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    lines += [
        f"| {name} | " + " | ".join(_format(metrics.get(key)) for key in keys) + " |"
        for name, metrics in models.items()
    ]
    if report["retention"]:
        lines += ["", "Retention (student_after / teacher): "]
        lines[-1] += ", ".join(f"{key} {value:.3f}" for key, value in report["retention"].items())
    training = report["training"]
    lines += [
        "",
        f"Training: {training['steps']} steps, {training['items_per_step']} items/step, "
        f"{training['train_seconds']:.1f} s, final loss {_format(training['final_loss'])}.",
    ]
    atomic_write_json(run_path / "report.json", report)
    atomic_write_text(run_path / "report.md", "\n".join(lines) + "\n")
    return report
