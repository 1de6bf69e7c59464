"""``report.html``: one self-contained page (inline base64 PNG plots, no network, no scripts).

Sections: the comparison table (every model in report.json, compressed students included),
loss curves of each term logged in the metrics files, size-vs-quality and speed-vs-quality
plots, the verdict, and the run's config. Every table cell carries its exact value in
``data-value`` (``repr`` of the float), so a test can check the page against report.json.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import yaml

from distill.io import atomic_write_text

__all__ = ["HTML_COLUMNS", "LOSS_TERMS_SKIPPED", "render_html", "write_html"]

# (key, title, format); bytes-like keys are shown in MB
HTML_COLUMNS = [
    ("params", "params", "{:,.0f}"),
    ("bytes", "disk MB", "{:.1f}"),
    ("perplexity", "held-out ppl", "{:.2f}"),
    ("kl_to_teacher", "KL(teacher||model) nats/tok", "{:.4f}"),
    ("top1_agreement", "top-1 agreement", "{:.3f}"),
    ("top5_agreement", "top-5 agreement", "{:.3f}"),
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
}
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


def _loss_plot(curves: dict[str, list[dict[str, Any]]]) -> str:
    terms = sorted(
        {
            key
            for history in curves.values()
            for record in history
            for key, value in record.items()
            if key not in LOSS_TERMS_SKIPPED and isinstance(value, int | float)
        }
    )
    if not terms:
        return "<p>No training metrics were logged.</p>"
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), squeeze=False)
    for axis, term in zip(axes[0], terms, strict=True):
        for label, history in curves.items():
            points = [(r["step"], r[term]) for r in history if term in r]
            if points:
                axis.plot(*zip(*points, strict=True), label=label)
        axis.set(title=term, xlabel="step", ylabel="nats / token")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return _png(figure)


def _scatter(models: dict[str, Any], x_key: str, x_label: str, x_scale: float) -> str:
    points = [
        (name, m[x_key] / x_scale, m["perplexity"])
        for name, m in models.items()
        if m.get(x_key) is not None and m.get("perplexity") is not None
    ]
    if not points:
        return f"<p>No {html.escape(x_label)} measurements.</p>"
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for name, x, y in points:
        axis.scatter(x, y)
        axis.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set(xlabel=x_label, ylabel="held-out perplexity (lower is better)")
    if max(p[2] for p in points) / max(min(p[2] for p in points), 1e-9) > 20:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def _cell(model: str, key: str, fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f'<td data-model="{html.escape(model)}" data-key="{key}">-</td>'
    shown = fmt.format(value / 1e6 if key in _MB_KEYS else value)
    return (
        f'<td data-model="{html.escape(model)}" data-key="{key}" '
        f'data-value="{value!r}">{html.escape(shown)}</td>'
    )


def _table(names: list[str], models: dict[str, Any]) -> str:
    columns = [c for c in HTML_COLUMNS if any(models[n].get(c[0]) is not None for n in names)]
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
    rows = []
    for name in names:
        cells = "".join(_cell(name, key, fmt, models[name].get(key)) for key, _, fmt in columns)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f'<table id="comparison"><tr><th>model</th>{head}</tr>{"".join(rows)}</table>'


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
    title = f"distill report: {report['run']['name']}"
    verdict = report.get("verdict") or ""
    config = yaml.safe_dump(report.get("config", {}), sort_keys=False)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Models</h2>",
        _table(names, models),
        f"<p>Speed settings: {html.escape(str(report.get('speed_settings', {})))}.</p>",
        f'<p id="verdict">{html.escape(verdict)}</p>',
        "<h2>Training loss terms</h2>",
        _loss_plot(curves),
        '<h2>Size and speed against quality</h2><div class="plots">',
        _scatter(models, "bytes", "weights on disk (MB)", 1e6),
        _scatter(models, "tokens_per_s", "greedy tokens/s at batch 1 (higher is faster)", 1.0),
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
