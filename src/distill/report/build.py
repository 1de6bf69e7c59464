"""Build ``report.json``, ``report.md`` and ``loss.png`` from a run directory's files.

Inputs: ``config.yaml``, ``metrics.jsonl`` (and ``metrics_labels_only.jsonl`` with a baseline),
``evaluation.json`` (``{"models": {name: {metric: value}}, "extra_sets": {set: {"models": ...}},
...}``). ``distill report RUN_DIR`` rebuilds these at any time.

The headline is fidelity: how close the student is to the teacher (KL, top-1 / top-5 agreement,
the teacher's NLL of the student's samples) on the training domain's held-out blocks and on
each held-out set of another kind; a student whose perplexity falls below the teacher's is
flagged as fitting the data rather than the teacher. A run with several teachers (``teachers:``)
also gets, per teacher, its share of the target tokens and the training divergence on its rows.
Bits per byte of held-out text compare
models across vocabularies; a student of another vocabulary than the teacher's has no
token-level numbers, and its cells say so (``n/a``, with the reason under the table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from distill.errors import DistillError
from distill.evaluate.bits_per_byte import TOKEN_METRICS
from distill.evaluate.fidelity import memorising
from distill.io import atomic_write_json, atomic_write_text, read_jsonl
from distill.report.html import describe_speed, write_html
from distill.report.tasks import write_task_report

__all__ = ["build_report", "teachers_summary", "MODEL_ORDER", "METRICS"]

MODEL_ORDER = ["teacher", "student_before", "student_after", "student_labels_only"]
# (key, column title, format, better)
METRICS = [
    ("params", "params", "{:,.0f}", "lower"),
    ("bytes", "safetensors MB", "{:.1f}", "lower"),
    ("perplexity", "held-out ppl", "{:.2f}", "lower"),
    ("bits_per_byte", "bits/byte (held-out text)", "{:.3f}", "lower"),
    ("kl_to_teacher", "KL(teacher ‖ model) nats/tok", "{:.4f}", "lower"),
    ("top1_agreement", "top-1 agreement", "{:.3f}", "higher"),
    ("top5_agreement", "top-5 agreement", "{:.3f}", "higher"),
    ("teacher_nll", "teacher NLL of samples", "{:.3f}", "lower"),
    ("teacher_sample_bpb", "teacher bits/byte of samples", "{:.3f}", "lower"),
    ("tokens_per_s", "gen tokens/s (batch 1)", "{:.1f}", "higher"),
    ("peak_rss_bytes", "peak RSS MB", "{:.0f}", "lower"),
]


ABSENT = "n/a"  # a token-level metric of a model with another vocabulary than the teacher's


def _cell(key: str, fmt: str, value: Any, row: dict[str, Any] | None = None) -> str:
    if value is None and row and row.get("token_metrics_absent") and key in TOKEN_METRICS:
        return ABSENT
    if value is None:
        return "-"
    if key in ("bytes", "peak_rss_bytes"):
        value = value / 1e6
    return fmt.format(value)


# the columns of each held-out set of another kind
SET_METRICS = [
    ("perplexity", "ppl", "{:.2f}", "lower"),
    ("bits_per_byte", "bits/byte", "{:.3f}", "lower"),
    ("kl_to_teacher", "KL(teacher ‖ model) nats/tok", "{:.4f}", "lower"),
    ("top1_agreement", "top-1 agreement", "{:.3f}", "higher"),
    ("top5_agreement", "top-5 agreement", "{:.3f}", "higher"),
    ("teacher_nll", "teacher NLL of samples", "{:.3f}", "lower"),
    ("teacher_sample_bpb", "teacher bits/byte of samples", "{:.3f}", "lower"),
]


def _ordered(models: dict[str, Any]) -> list[str]:
    return [name for name in MODEL_ORDER if name in models] + [
        name for name in models if name not in MODEL_ORDER
    ]


def _md_table(models: dict[str, Any], metrics: list[tuple[str, str, str, str]]) -> list[str]:
    columns = [m for m in metrics if any(models[n].get(m[0]) is not None for n in models)]
    lines = [
        "| model | " + " | ".join(title for _, title, _, _ in columns) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for name in _ordered(models):
        row = models[name]
        cells = [_cell(key, fmt, row.get(key), row) for key, _, fmt, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + _absent_note(models)


def _absent_note(models: dict[str, Any]) -> list[str]:
    """A line under a table saying why some models have no token-level metrics."""
    reasons: dict[str, list[str]] = {}
    for name in _ordered(models):
        reason = models[name].get("token_metrics_absent")
        if reason:
            reasons.setdefault(reason, []).append(name)
    return (
        ["", *(f"{ABSENT} for {', '.join(names)}: {why}." for why, names in reasons.items())]
        if reasons
        else []
    )


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# distill report: {report['run']['name']}",
        "",
        "## Held-out blocks of the training domain",
        "",
        *_md_table(report["models"], METRICS),
    ]
    for set_name, held in report.get("extra_sets", {}).items():
        lines += [
            "",
            f"## Held-out set `{set_name}` (another kind of text: {held['blocks']} blocks, "
            f"{held['tokens']} tokens, from {Path(held['source']).name})",
            "",
            *_md_table(held["models"], SET_METRICS),
        ]
    lines.append("")
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
        "Held-out metrics use the same held-out blocks for every model; teacher NLL of samples "
        "is the teacher's negative log-likelihood per token of what each model writes from "
        "held-out prefixes (sampled at T=1, same seed); speed and peak RSS are measured for each "
        "model in a fresh process with the same prompts and thread count "
        f"({describe_speed(report['speed_settings'])}).",
    ]
    lines += _teachers_markdown(report)
    bpb = report.get("bits_per_byte_settings")
    if bpb:
        lines += [
            "",
            "Bits/byte: each model's negative log-likelihood of held-out text with its own "
            "tokenizer, in bits per UTF-8 byte (comparable across vocabularies; "
            f"{bpb['sets'].get('heldout', 0):,} bytes of held-out text, pieces of at most "
            f"{bpb['piece_chars']} characters, each scored from the {bpb['start_token']} token).",
        ]
    if any(row.get("teacher_sample_bpb") is not None for row in report["models"].values()):
        lines += [
            "",
            "Teacher bits/byte of samples: each model continues held-out prefixes with its own "
            "tokenizer (T=1, same seed); the teacher re-tokenizes the text and scores the "
            "continuation, in bits per UTF-8 byte.",
        ]
    warning = report.get("plan", {}).get("memorisation_warning")
    if warning:
        lines += ["", f"Plan: {warning}."]
    qad = [
        f"- `{name}`: {row['quantize']}, {row['qad_steps']} QAD steps: KL to the teacher "
        f"{row['kl_before_qad']:.4f} before, {row['kl_to_teacher']:.4f} after "
        f"({row['kl_before_qad'] / max(row['kl_to_teacher'], 1e-12):.2f}x lower)"
        for name, row in report["models"].items()
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


def teachers_summary(history: list[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any]:
    """Per teacher of a run with ``teachers:`` (records with ``teachers``; empty otherwise), over
    its logged steps: where it lives (from the plan), its target tokens and their share of all,
    the mean divergence on its rows (weighted by tokens), and that divergence at the first and
    the last logged step where it had rows."""
    records = [record for record in history if "teachers" in record]
    if not records:
        return {}
    total = sum(own["targets"] for record in records for own in record["teachers"].values())
    summary = {}
    for name in records[0]["teachers"]:
        own = [record["teachers"][name] for record in records]
        measured = [row for row in own if row["divergence"] is not None]
        targets = sum(row["targets"] for row in own)
        divergence_sum = sum(row["divergence"] * row["targets"] for row in measured)
        summary[name] = {
            **plan.get("teachers", {}).get(name, {}),
            "targets": targets,
            "share": targets / total if total else 0.0,
            "divergence": divergence_sum / targets if targets else None,
            "divergence_first": measured[0]["divergence"] if measured else None,
            "divergence_last": measured[-1]["divergence"] if measured else None,
        }
    return summary


def _teachers_markdown(report: dict[str, Any]) -> list[str]:
    teachers = report["training"].get("teachers")
    if not teachers:
        return []
    divergence = report["config"].get("loss", {}).get("divergence", "forward_kl")
    lines = [
        "",
        "## Teachers",
        "",
        f"Each training row was distilled from its own teacher; over the logged steps ({divergence}"
        " at the training temperature, nats per target token of that teacher's rows):",
        "",
        f"| teacher | where | share of target tokens | {divergence} on its rows | first logged "
        "step | last logged step |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in teachers.items():
        cells = [
            f"{row.get('kind', '')} {row.get('where', '')}".strip() or "-",
            f"{row['share']:.3f}",
            *(
                "-" if row[key] is None else f"{row[key]:.4f}"
                for key in ("divergence", "divergence_first", "divergence_last")
            ),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _plot_losses(
    path: Path, curves: dict[str, list[dict[str, Any]]], models: dict[str, Any], divergence: str
) -> None:
    """Training CE and the logged divergence (``loss.divergence``, named in the title) per step,
    with the held-out CE and KL of each model as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = any("fidelity" in record for history in curves.values() for record in history)
    figure, axes = plt.subplots(1, 3 if probed else 2, figsize=(16 if probed else 11, 4))
    loss_axis, kl_axis = axes[0], axes[1]
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
        if name in models and models[name].get("perplexity") and "kl_to_teacher" in models[name]:
            import math

            loss_axis.axhline(
                math.log(models[name]["perplexity"]),
                color=style[0],
                linestyle=style[1:],
                label=f"{name}: held-out CE",
            )
        if name in models and models[name].get("kl_to_teacher") is not None:
            kl_axis.axhline(
                models[name]["kl_to_teacher"],
                color=style[0],
                linestyle=style[1:],
                label=f"{name}: held-out KL at T=1",
            )
    if probed:
        _plot_fidelity(kl_axis, axes[2], curves)
    loss_axis.set(xlabel="step", ylabel="nats / token", title="cross-entropy")
    kl_axis.set(xlabel="step", ylabel="nats / token", title=f"{divergence} (train) / KL (held-out)")
    kl_axis.set_yscale("symlog", linthresh=0.1)
    kl_axis.set_ylim(bottom=0)
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)


def fidelity_points(
    history: list[dict[str, Any]], set_name: str, key: str
) -> list[tuple[int, float]]:
    """``(step, value)`` of ``fidelity[set_name][key]`` in the records that carry it."""
    return [
        (record["step"], record["fidelity"][set_name][key])
        for record in history
        if set_name in record.get("fidelity", {})
    ]


def _plot_fidelity(kl_axis, agreement_axis, curves: dict[str, list[dict[str, Any]]]) -> None:
    """Held-out KL (on the KL panel) and top-1 agreement measured during training."""
    for label, history in curves.items():
        sets = {name for record in history for name in record.get("fidelity", {})}
        for set_name in sorted(sets):
            kl = fidelity_points(history, set_name, "kl_to_teacher")
            kl_axis.plot(*zip(*kl, strict=True), marker="o", ms=3, label=f"{label}: {set_name} KL")
            agree = fidelity_points(history, set_name, "top1_agreement")
            agreement_axis.plot(
                *zip(*agree, strict=True), marker="o", ms=3, label=f"{label}: {set_name}"
            )
    agreement_axis.set(
        xlabel="step", ylabel="share of tokens", title="top-1 agreement with the teacher (held-out)"
    )
    agreement_axis.set_ylim(0, 1)


def _moved(before: dict[str, Any], after: dict[str, Any]) -> str:
    """``KL b -> a nats/token, top-1 agreement b -> a`` (and top-5 when measured)."""
    text = (
        f"KL to the teacher {before['kl_to_teacher']:.3f} -> {after['kl_to_teacher']:.3f} "
        f"nats/token, top-1 agreement {before['top1_agreement']:.3f} -> "
        f"{after['top1_agreement']:.3f}"
    )
    if before.get("top5_agreement") is not None and after.get("top5_agreement") is not None:
        text += f", top-5 {before['top5_agreement']:.3f} -> {after['top5_agreement']:.3f}"
    return text


def _verdict(models: dict[str, Any], extra_sets: dict[str, Any] | None = None) -> str | None:
    """Fidelity first: how far distillation moved the student towards the teacher on every
    held-out set; then perplexity, flagged when it falls below the teacher's (memorisation)."""
    if "student_after" not in models or "student_before" not in models:
        return None
    after, before = models["student_after"], models["student_before"]
    if after.get("token_metrics_absent"):
        return _bytes_verdict(models)
    text = (
        f"Fidelity to the teacher, held-out text of the training domain: {_moved(before, after)}."
    )
    for set_name, held in (extra_sets or {}).items():
        scored = held["models"]
        if "student_after" in scored and "student_before" in scored:
            text += f" On {set_name} (another kind of text): {_moved(scored['student_before'], scored['student_after'])}."
    teacher = models.get("teacher", {})
    text += f" Held-out perplexity {before['perplexity']:.1f} -> {after['perplexity']:.1f}"
    text += f" (teacher {teacher['perplexity']:.1f})." if teacher.get("perplexity") else "."
    if memorising(after, teacher):
        text += (
            f" Warning: the student's held-out perplexity ({after['perplexity']:.1f}) is below "
            f"the teacher's ({teacher['perplexity']:.1f}): it is fitting the training data "
            "rather than the teacher (memorisation); judge it by KL and agreement, and give it "
            "more data or fewer passes over it."
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


def _bytes_verdict(models: dict[str, Any]) -> str | None:
    """The verdict for a student of another vocabulary: bits per byte and the teacher's bits per
    byte of its samples (token-level numbers do not exist across vocabularies), beside the
    teacher's own and the labels-only twin's."""
    after, before = models["student_after"], models["student_before"]
    references = {"teacher": models.get("teacher", {})}
    references["labels only"] = models.get("student_labels_only", {})
    parts = []
    for key, what in (
        ("bits_per_byte", "held-out bits per byte"),
        ("teacher_sample_bpb", "the teacher's bits per byte of the student's samples"),
    ):
        if before.get(key) is not None and after.get(key) is not None:
            others = [f"{who} {row[key]:.3f}" for who, row in references.items() if row.get(key)]
            beside = f" ({', '.join(others)})" if others else ""
            parts.append(f"{what} {before[key]:.3f} -> {after[key]:.3f}{beside}")
    if not parts:
        return None
    return (
        "The student has its own vocabulary, so it is compared with the teacher per byte of "
        f"text: {'; '.join(parts)}."
    )


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
    extra_sets = evaluation.get("extra_sets", {})
    report = {
        "run": {"name": config["name"], "dir": str(run_path)},
        "models": models,
        "extra_sets": extra_sets,
        "training": {
            "steps": len(history) and history[-1]["step"],
            "tokens_per_step": history[-1]["tokens"] if history else 0,
            "train_seconds": history[-1]["elapsed_s"] if history else 0.0,
            "final_loss": history[-1]["loss"] if history else float("nan"),
            **_onpolicy_summary(history),
        },
        "speed_settings": evaluation.get("speed_settings", {}),
        "bits_per_byte_settings": evaluation.get("bits_per_byte_settings"),
        "plan": evaluation.get("plan", {}),
        "verdict": _verdict(models, extra_sets),
        "config": config,
    }
    teachers = teachers_summary(history, report["plan"])
    if teachers:
        report["training"]["teachers"] = teachers
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
