"""``report.html``: one self-contained page (inline base64 PNG plots, no network, no scripts).

Sections: the comparison table (every model in report.json, compressed students included), one
table per held-out set of another kind (``data-set`` on its cells), the verdict, loss curves of
each term logged in the metrics files, fidelity (held-out KL and top-1 agreement) measured during
training, size-vs-fidelity and speed-vs-fidelity plots, and the run's config. Every table cell
carries its exact value in ``data-value`` (``repr`` of the float), so a test can check the page
against report.json.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import yaml

from distill.evaluate.bits_per_byte import TOKEN_METRICS
from distill.io import atomic_write_text

__all__ = [
    "HTML_COLUMNS",
    "LOSS_TERMS_SKIPPED",
    "describe_speed",
    "loss_terms",
    "render_html",
    "write_html",
]

# (key, title, format); bytes-like keys are shown in MB
HTML_COLUMNS = [
    ("params", "params", "{:,.0f}"),
    ("bytes", "disk MB", "{:.1f}"),
    ("perplexity", "held-out ppl", "{:.2f}"),
    ("bits_per_byte", "bits/byte (held-out text)", "{:.3f}"),
    ("kl_to_teacher", "KL(teacher||model) nats/tok", "{:.4f}"),
    ("top1_agreement", "top-1 agreement", "{:.3f}"),
    ("top5_agreement", "top-5 agreement", "{:.3f}"),
    ("teacher_nll", "teacher NLL of samples", "{:.3f}"),
    ("teacher_sample_bpb", "teacher bits/byte of samples", "{:.3f}"),
    ("mc_accuracy", "MC accuracy", "{:.3f}"),
    ("tokens_per_s", "gen tokens/s (batch 1)", "{:.1f}"),
    ("peak_rss_bytes", "peak RSS MB", "{:.0f}"),
]
LOSS_TERMS_SKIPPED = {
    "step",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "items",
    "items_per_s",
    "elapsed_s",
    "comm_s",
    "eval_s",
}
# terms logged in nats per token (the others are shares, counts or layer-loss units)
_NATS_TERMS = {"loss", "ce", "divergence"}
# the per-set table's columns
_SET_COLUMNS = [
    c
    for c in HTML_COLUMNS
    if c[0]
    in {
        "perplexity",
        "bits_per_byte",
        "kl_to_teacher",
        "top1_agreement",
        "top5_agreement",
        "teacher_nll",
        "teacher_sample_bpb",
    }
]
_MB_KEYS = {"bytes", "peak_rss_bytes"}


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{encoded}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_terms(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The numeric terms of the metrics records plotted as training curves (not the step,
    rates, times such as ``comm_s``, nor the nested ``fidelity`` record)."""
    return sorted(
        {
            key
            for history in curves.values()
            for record in history
            for key, value in record.items()
            if key not in LOSS_TERMS_SKIPPED
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        }
    )


def _loss_plot(curves: dict[str, list[dict[str, Any]]]) -> str:
    terms = loss_terms(curves)
    if not terms:
        return "<p>No training metrics were logged.</p>"
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for axis, term in zip(axes[0], terms, strict=True):
        for label, history in curves.items():
            points = [(r["step"], r[term]) for r in history if term in r]
            if points:
                axis.plot(*zip(*points, strict=True), label=label)
        axis.set(title=term, xlabel="step", ylabel="nats / token" if term in _NATS_TERMS else "")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return _png(figure)


def _fidelity_plot(curves: dict[str, list[dict[str, Any]]]) -> str:
    """Held-out KL and top-1 agreement against the step, per held-out set (``eval.every``)."""
    series = {
        (label, set_name): [r for r in history if set_name in r.get("fidelity", {})]
        for label, history in curves.items()
        for set_name in sorted({n for r in history for n in r.get("fidelity", {})})
    }
    if not series:
        return "<p>Not measured during training (eval.every = 0, or no live teacher).</p>"
    plt = _pyplot()
    figure, (kl_axis, agree_axis) = plt.subplots(1, 2, figsize=(10, 3.4))
    for (label, set_name), records in series.items():
        steps = [r["step"] for r in records]
        name = f"{label}: {set_name}"
        kl_axis.plot(
            steps,
            [r["fidelity"][set_name]["kl_to_teacher"] for r in records],
            marker="o",
            ms=3,
            label=name,
        )
        agree_axis.plot(
            steps,
            [r["fidelity"][set_name]["top1_agreement"] for r in records],
            marker="o",
            ms=3,
            label=name,
        )
    kl_axis.set(title="held-out KL(teacher || student)", xlabel="step", ylabel="nats / token")
    agree_axis.set(title="held-out top-1 agreement", xlabel="step", ylabel="share of tokens")
    agree_axis.set_ylim(0, 1)
    for axis in (kl_axis, agree_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return _png(figure)


def _scatter(
    models: dict[str, Any],
    extra: dict[str, Any],
    x_key: str,
    x_label: str,
    x_scale: float,
) -> str:
    """Fidelity (KL to the teacher, lower is better) against size or speed: filled markers on
    the training domain's held-out blocks, hollow ones on the first held-out set of another
    kind (``extra``: ``{name: metrics}`` of that set)."""
    points = [
        (name, m[x_key] / x_scale, m["kl_to_teacher"], (extra.get(name) or {}).get("kl_to_teacher"))
        for name, m in models.items()
        if m.get(x_key) is not None and m.get("kl_to_teacher") is not None
    ]
    if not points:
        return f"<p>No {html.escape(x_label)} measurements.</p>"
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for name, x, y, other in points:
        dot = axis.scatter(x, y)
        if other is not None:
            axis.scatter(x, other, facecolors="none", edgecolors=dot.get_facecolor())
        axis.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set(xlabel=x_label, ylabel="KL(teacher || model) nats/token (lower is better)")
    if extra:
        axis.set_title("filled: training-domain held-out; hollow: other kind", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def describe_speed(settings: dict[str, Any]) -> str:
    """The speed test's settings in words (``evaluation.json``'s ``speed_settings``)."""
    if not settings:
        return "not measured"
    sizes = settings.get("batch_sizes") or [settings.get("batch")]
    runs = settings.get("timed_runs")
    return (
        f"{settings['threads']} thread{'' if settings['threads'] == 1 else 's'}, "
        f"{settings['prompts']} prompt(s) x "
        f"{settings['new_tokens']} new tokens, {settings.get('decoding', 'greedy')} decoding, "
        f"batch size {' and '.join(str(b) for b in sizes if b is not None)}"
        + (f", median of {runs} timed runs" if runs else "")
    )


def _cell(
    model: str, key: str, fmt: str, value: Any, held_set: str | None = None, absent: str = ""
) -> str:
    where = f' data-set="{html.escape(held_set)}"' if held_set else ""
    if value is None and absent and key in TOKEN_METRICS:
        return (
            f'<td data-model="{html.escape(model)}" data-key="{key}"{where} '
            f'data-absent="{html.escape(absent)}" title="{html.escape(absent)}">n/a</td>'
        )
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f'<td data-model="{html.escape(model)}" data-key="{key}"{where}>-</td>'
    shown = fmt.format(value / 1e6 if key in _MB_KEYS else value)
    return (
        f'<td data-model="{html.escape(model)}" data-key="{key}"{where} '
        f'data-value="{value!r}">{html.escape(shown)}</td>'
    )


def _table(
    names: list[str],
    models: dict[str, Any],
    columns: list[tuple[str, str, str]] = HTML_COLUMNS,
    held_set: str | None = None,
) -> str:
    names = [n for n in names if n in models]
    columns = [c for c in columns if any(models[n].get(c[0]) is not None for n in names)]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    rows = []
    for name in names:
        absent = models[name].get("token_metrics_absent") or ""
        cells = "".join(
            _cell(name, key, fmt, models[name].get(key), held_set, absent)
            for key, _, fmt in columns
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    table_id = f"set-{held_set}" if held_set else "comparison"
    reasons = dict.fromkeys(
        reason for n in names if (reason := models[n].get("token_metrics_absent"))
    )
    note = "".join(f"<p>n/a: {html.escape(reason)}.</p>" for reason in reasons)
    return (
        f'<table id="{html.escape(table_id)}"><tr><th>model</th>{head}</tr>{"".join(rows)}</table>'
        + note
    )


def _teachers_table(report: dict[str, Any]) -> list[str]:
    """A run with several teachers: each one's place, share of target tokens and divergence on
    its rows (the same numbers as report.md's Teachers table)."""
    teachers = (report.get("training") or {}).get("teachers")
    if not teachers:
        return []
    divergence = (report.get("config") or {}).get("loss", {}).get("divergence", "forward_kl")
    titles = ("where", "share of target tokens", f"{divergence} on its rows", "first", "last")
    head = "".join(f"<th>{html.escape(title)}</th>" for title in titles)
    rows = []
    for name, row in teachers.items():
        where = f"{row.get('kind', '')} {row.get('where', '')}".strip() or "-"
        values = [row[key] for key in ("divergence", "divergence_first", "divergence_last")]
        cells = [html.escape(where), f"{row['share']:.3f}"]
        cells += ["-" if value is None else f"{value:.4f}" for value in values]
        rows.append(
            f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    return [
        "<h3>Teachers</h3>",
        f'<table id="teachers"><tr><th>teacher</th>{head}</tr>{"".join(rows)}</table>',
    ]


def _set_tables(names: list[str], extra_sets: dict[str, Any]) -> list[str]:
    parts = []
    for set_name, held in extra_sets.items():
        parts += [
            f"<h3>Held-out set {html.escape(set_name)}</h3>",
            f"<p>Another kind of text than the training data: {held['blocks']} blocks, "
            f"{held['tokens']} tokens, from {html.escape(Path(held['source']).name)}.</p>",
            _table(names, held["models"], _SET_COLUMNS, set_name),
        ]
    return parts


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #ccc;
padding: 4px 8px; text-align: right; } th:first-child { text-align: left; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; } .plots { display: flex; gap: 1em; flex-wrap: wrap; }
"""


def render_html(
    report: dict[str, Any], curves: dict[str, list[dict[str, Any]]], model_order: list[str]
) -> str:
    """The page's HTML for a report dict (report.json's content) and the metrics histories."""
    models = report["models"]
    names = [n for n in model_order if n in models] + [n for n in models if n not in model_order]
    extra_sets = report.get("extra_sets") or {}
    first_set = next(iter(extra_sets.values()), {}).get("models", {})
    title = f"distill report: {report['run']['name']}"
    verdict = report.get("verdict") or ""
    config = yaml.safe_dump(report.get("config", {}), sort_keys=False)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Models</h2>",
        "<h3>Held-out blocks of the training domain</h3>",
        _table(names, models),
        *_set_tables(names, extra_sets),
        *_teachers_table(report),
        f"<p>Speed settings: {html.escape(describe_speed(report.get('speed_settings', {})))}.</p>",
        f'<p id="verdict">{html.escape(verdict)}</p>',
        "<h2>Training loss terms</h2>",
        _loss_plot(curves),
        "<h2>Fidelity during training</h2>",
        _fidelity_plot(curves),
        '<h2>Size and speed against fidelity</h2><div class="plots">',
        _scatter(models, first_set, "bytes", "weights on disk (MB)", 1e6),
        _scatter(
            models, first_set, "tokens_per_s", "greedy tokens/s at batch 1 (higher is faster)", 1.0
        ),
        "</div>",
        "<h2>Config</h2>",
        f"<pre>{html.escape(config)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(
    run_dir: str | Path,
    report: dict[str, Any],
    curves: dict[str, list[dict[str, Any]]],
    model_order: list[str],
) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path."""
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_html(report, curves, model_order))
    return path
