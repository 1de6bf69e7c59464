"""The oldest-versions venv (``make test-compat``) pins exactly pyproject.toml's lower bounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_lower_bound_is_pinned_in_requirements_oldest():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lower = {}
    for requirement in project["dependencies"]:
        found = re.search(r">=\s*([0-9][0-9.]*)", requirement)
        assert found, f"{requirement}: every runtime dependency declares a lower bound"
        lower[_name(requirement)] = found.group(1)
    pins = {}
    for line in (ROOT / "requirements-oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    for name, version in lower.items():
        assert name in pins, f"{name} has no pin in requirements-oldest.txt"
        padded = pins[name].split(".")
        bound = version.split(".")
        assert padded[: len(bound)] == bound and all(p == "0" for p in padded[len(bound) :]), (
            f"{name}: pyproject says >={version}, requirements-oldest.txt pins {pins[name]}"
        )
