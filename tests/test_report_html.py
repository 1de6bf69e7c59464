"""report.html: self-contained (inline PNGs, no network), numbers equal report.json's; and it
renders in headless Chromium (marked `browser`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from distill.report import build_report


class Cells(HTMLParser):
    """Collects (model, key) -> (data-value, shown text) of the comparison table."""

    def __init__(self):
        super().__init__()
        self.cells: dict[tuple[str, str], tuple[str | None, str]] = {}
        self.images: list[str] = []
        self.tags: set[str] = set()
        self._open: tuple[str, str, str | None] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src", ""))
        if tag == "td" and "data-key" in attributes:
            self._open = (
                attributes["data-model"],
                attributes["data-key"],
                attributes.get("data-value"),
            )

    def handle_data(self, data):
        if self._open:
            model, key, value = self._open
            self.cells[(model, key)] = (value, data.strip())
            self._open = None


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"name": "html-test", "loss": {"alpha": 0.5}}))
    with (path / "metrics.jsonl").open("w") as handle:
        for step in range(1, 6):
            record = {
                "step": step,
                "loss": 5.0 / step,
                "ce": 6.0 / step,
                "divergence": 1.0 / step,
                "lr": 1e-4,
                "grad_norm": 1.0,
                "tokens": 64,
                "tokens_per_s": 100.0,
                "elapsed_s": float(step),
            }
            handle.write(json.dumps(record) + "\n")
    models = {
        "teacher": {
            "params": 1000,
            "bytes": 4_000_000,
            "perplexity": 10.0,
            "kl_to_teacher": 0.0,
            "top1_agreement": 1.0,
            "tokens_per_s": 20.0,
            "peak_rss_bytes": 5e8,
        },
        "student_before": {
            "params": 600,
            "bytes": 2_400_000,
            "perplexity": 400.0,
            "kl_to_teacher": 3.0,
            "top1_agreement": 0.1,
            "tokens_per_s": 35.0,
            "peak_rss_bytes": 4e8,
        },
        "student_after": {
            "params": 600,
            "bytes": 2_400_000,
            "perplexity": 30.123456,
            "kl_to_teacher": 1.25,
            "top1_agreement": 0.4,
            "tokens_per_s": 34.5,
            "peak_rss_bytes": 4e8,
        },
        "student_int8": {
            "params": 600,
            "bytes": 700_000,
            "perplexity": 31.5,
            "kl_to_teacher": 1.3,
            "top1_agreement": 0.39,
            "top5_agreement": 0.7,
            "tokens_per_s": 60.25,
            "peak_rss_bytes": None,
        },
    }
    (path / "evaluation.json").write_text(json.dumps({"models": models, "speed_settings": {}}))
    return path


def check_cells_against_report(cells: Cells, report: dict) -> int:
    checked = 0
    for model, values in report["models"].items():
        for key, value in values.items():
            if (model, key) not in cells.cells:
                continue
            shown_value, text = cells.cells[(model, key)]
            if value is None:
                assert shown_value is None and text == "-"
            else:
                assert float(shown_value) == value, (model, key)
                checked += 1
    return checked


def test_html_is_self_contained_and_matches_report_json(run_dir):
    report = build_report(run_dir)
    page = (run_dir / "report.html").read_text()
    parser = Cells()
    parser.feed(page)
    assert check_cells_against_report(parser, report) >= 25
    assert parser.cells[("student_after", "perplexity")][1] == "30.12"
    assert parser.cells[("student_int8", "bytes")][1] == "0.7"
    assert len(parser.images) == 3 and all(
        src.startswith("data:image/png;base64,") for src in parser.images
    )
    assert not {"script", "link", "iframe"} & parser.tags
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "html-test" in page and "alpha: 0.5" in page  # the config is on the page
    assert json.loads((run_dir / "report.json").read_text())["models"] == report["models"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    install = subprocess.run(
        ["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True, timeout=600
    )
    if install.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(
            f"chromium is not installed and apt-get could not install it: "
            f"{install.stderr.strip()[-200:]}"
        )
    return shutil.which("chromium")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    report = build_report(run_dir)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", (run_dir / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    parser = Cells()
    parser.feed(dom)
    assert check_cells_against_report(parser, report) >= 25
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [
            browser,
            *flags,
            f"--screenshot={screenshot}",
            "--window-size=1400,2400",
            (run_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert screenshot.stat().st_size > 10_000  # tables and three plots painted


def test_speed_settings_read_as_text_and_times_are_not_loss_terms(run_dir):
    from distill.report.html import loss_terms

    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    evaluation["speed_settings"] = {
        "threads": 2,
        "prompts": 3,
        "new_tokens": 32,
        "batch_sizes": [1, 8],
        "timed_runs": 3,
        "decoding": "greedy",
    }
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.update(comm_s=0.01, eval_s=0.2)
    records[-1]["fidelity"] = {"heldout": {"kl_to_teacher": 1.0, "top1_agreement": 0.5}}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    build_report(run_dir)
    page = (run_dir / "report.html").read_text()
    assert "{'" not in page and "{&#x27;" not in page  # no Python dict on the page
    expected = (
        "Speed settings: 2 threads, 3 prompt(s) x 32 new tokens, greedy decoding, batch size 1 "
        "and 8, median of 3 timed runs."
    )
    assert expected in page
    assert loss_terms({"distilled": records}) == ["ce", "divergence", "loss"]
    assert page.count("data:image/png;base64,") == 4  # losses, fidelity, size, speed
