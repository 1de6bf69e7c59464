"""Build ``report.json``, ``report.md`` and ``loss.png`` from a run directory's files.

Inputs: ``config.yaml``, ``metrics.jsonl`` (and ``metrics_labels_only.jsonl`` with a baseline),
``evaluation.json`` (``{"models": {name: {metric: value}}, ...}``). ``distill report RUN_DIR``
rebuilds these at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError
from distill.io import atomic_write_json, atomic_write_text, read_jsonl
from distill.report.html import write_html
from distill.report.tasks import write_task_report

__all__ = ["build_report", "MODEL_ORDER", "METRICS"]

MODEL_ORDER = ["teacher", "student_before", "student_after", "student_labels_only"]
# (key, column title, format, better)
METRICS = [
    ("params", "params", "{:,.0f}", "lower"),
    ("bytes", "safetensors MB", "{:.1f}", "lower"),
    ("perplexity", "held-out ppl", "{:.2f}", "lower"),
    ("kl_to_teacher", "KL(teacher ‖ model) nats/tok", "{:.4f}", "lower"),
    ("top1_agreement", "top-1 agreement", "{:.3f}", "higher"),
    ("tokens_per_s", "gen tokens/s (batch 1)", "{:.1f}", "higher"),
    ("peak_rss_bytes", "peak RSS MB", "{:.0f}", "lower"),
]


def _cell(key: str, fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("bytes", "peak_rss_bytes"):
        value = value / 1e6
    return fmt.format(value)


def _markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    names = [name for name in MODEL_ORDER if name in models] + [
        name for name in models if name not in MODEL_ORDER
    ]
    header = "| model | " + " | ".join(title for _, title, _, _ in METRICS) + " |"
    lines = [
        f"# distill report: {report['run']['name']}",
        "",
        header,
        "|" + "---|" * (len(METRICS) + 1),
    ]
    for name in names:
        cells = [_cell(key, fmt, models[name].get(key)) for key, _, fmt, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    training = report["training"]
    lines += [
        "",
        f"Training: {training['steps']} steps, {training['tokens_per_step']} tokens/step, "
        f"{training['train_seconds']:.0f} s, final loss {training['final_loss']:.4f}."
        + (
            f" On-policy micro-batches: {training['onpolicy_fraction']:.0%}, student "
            f"continuations {training['generated_tokens_mean']:.1f} tokens on average."
            if "onpolicy_fraction" in training
            else ""
        ),
        "Held-out metrics use the same held-out blocks for every model; speed and peak RSS are "
        "measured for each model in a fresh process with the same prompts and thread count "
        f"({_describe_speed(report['speed_settings'])}).",
    ]
    qad = [
        f"- `{name}`: {row['quantize']}, {row['qad_steps']} QAD steps: KL to the teacher "
        f"{row['kl_before_qad']:.4f} before, {row['kl_to_teacher']:.4f} after "
        f"({row['kl_before_qad'] / max(row['kl_to_teacher'], 1e-12):.2f}x lower)"
        for name, row in models.items()
        if row.get("qad_steps") and row.get("kl_before_qad") is not None
    ]
    if qad:
        lines += [
            "",
            "Quantization-aware distillation (each row's model before QAD is listed too):",
        ]
        lines += qad
    verdict = report.get("verdict")
    if verdict:
        lines += ["", verdict]
    return "\n".join(lines) + "\n"


def _describe_speed(settings: dict[str, Any]) -> str:
    if not settings:
        return "not measured"
    return (
        f"{settings['threads']} threads, {settings['prompts']} prompts x {settings['new_tokens']} "
        f"new tokens, batch {settings.get('batch_sizes', [settings.get('batch')])[0]}, "
        f"{settings['decoding']} decoding"
    )


def _plot_losses(
    path: Path, curves: dict[str, list[dict[str, Any]]], models: dict[str, Any], divergence: str
) -> None:
    """Training CE and the logged divergence (``loss.divergence``, named in the title) per step,
    with the held-out CE and KL of each model as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, kl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in curves.items():
        steps = [record["step"] for record in history]
        loss_axis.plot(steps, [record["ce"] for record in history], label=f"{label}: train CE")
        if any(record["divergence"] for record in history):
            kl_axis.plot(
                steps,
                [record["divergence"] for record in history],
                label=f"{label}: train {divergence} at T",
            )
    styles = {"teacher": "k--", "student_before": "r:", "student_after": "g-."}
    for name, style in styles.items():
        if name in models and models[name].get("perplexity"):
            import math

            loss_axis.axhline(
                math.log(models[name]["perplexity"]),
                color=style[0],
                linestyle=style[1:],
                label=f"{name}: held-out CE",
            )
            kl_axis.axhline(
                models[name]["kl_to_teacher"],
                color=style[0],
                linestyle=style[1:],
                label=f"{name}: held-out KL at T=1",
            )
    loss_axis.set(xlabel="step", ylabel="nats / token", title="cross-entropy")
    kl_axis.set(xlabel="step", ylabel="nats / token", title=f"{divergence} (train) / KL (held-out)")
    kl_axis.set_yscale("symlog", linthresh=0.1)
    kl_axis.set_ylim(bottom=0)
    for axis in (loss_axis, kl_axis):
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)


def _verdict(models: dict[str, Any]) -> str | None:
    if "student_after" not in models or "student_before" not in models:
        return None
    after, before = models["student_after"], models["student_before"]
    text = (
        f"Distillation moved the student's held-out KL to the teacher from "
        f"{before['kl_to_teacher']:.3f} to {after['kl_to_teacher']:.3f} nats/token "
        f"(perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f})."
    )
    if "student_labels_only" in models:
        labels_only = models["student_labels_only"]
        better = after["kl_to_teacher"] < labels_only["kl_to_teacher"]
        text += (
            f" Trained on labels alone for the same steps it reached KL "
            f"{labels_only['kl_to_teacher']:.3f}, perplexity {labels_only['perplexity']:.1f}: "
            f"distillation {'beat' if better else 'did not beat'} plain fine-tuning on KL."
        )
    return text


def _onpolicy_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """Share of on-policy micro-batches and mean student continuation length over the run."""
    records = [r for r in history if "onpolicy_fraction" in r]
    if not records:
        return {}
    lengths = [r["generated_tokens_mean"] for r in records if r["generated_tokens_mean"]]
    return {
        "onpolicy_fraction": sum(r["onpolicy_fraction"] for r in records) / len(records),
        "generated_tokens_mean": sum(lengths) / len(lengths) if lengths else 0.0,
    }


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Write report.json, report.md (and, for causal LMs, loss.png and report.html) for a
    finished run of any task; return the report dict."""
    run_path = Path(run_dir)
    evaluation_path = run_path / "evaluation.json"
    if not evaluation_path.is_file():
        raise DistillError(f"{run_path} has no evaluation.json: is it a finished distill run?")
    evaluation = json.loads(evaluation_path.read_text())
    task = evaluation.get("task", "causal_lm")
    if task == "module":  # an nn.Module run (no config.yaml)
        return write_task_report(run_path, "module distillation")
    config = yaml.safe_load((run_path / "config.yaml").read_text())
    if task != "causal_lm":  # classification / embedding: their own metrics
        return write_task_report(run_path, f"{config['name']} ({task})")
    history = read_jsonl(run_path / "metrics.jsonl")
    curves = {"distilled": history}
    labels_only = read_jsonl(run_path / "metrics_labels_only.jsonl")
    if labels_only:
        curves["labels only"] = labels_only
    models = evaluation["models"]
    report = {
        "run": {"name": config["name"], "dir": str(run_path)},
        "models": models,
        "training": {
            "steps": len(history) and history[-1]["step"],
            "tokens_per_step": history[-1]["tokens"] if history else 0,
            "train_seconds": history[-1]["elapsed_s"] if history else 0.0,
            "final_loss": history[-1]["loss"] if history else float("nan"),
            **_onpolicy_summary(history),
        },
        "speed_settings": evaluation.get("speed_settings", {}),
        "plan": evaluation.get("plan", {}),
        "verdict": _verdict(models),
        "config": config,
    }
    atomic_write_json(run_path / "report.json", report)
    atomic_write_text(run_path / "report.md", _markdown(report))
    divergence = config.get("loss", {}).get("divergence", "forward_kl")
    _plot_losses(run_path / "loss.png", curves, models, divergence)
    html_curves = dict(curves)
    compress_logs = [*run_path.glob("metrics_heal_*.jsonl"), *run_path.glob("metrics_qad_*.jsonl")]
    for heal_path in sorted(compress_logs):
        html_curves[heal_path.stem.removeprefix("metrics_")] = read_jsonl(heal_path)
    write_html(run_path, report, html_curves, MODEL_ORDER)
    return report
