"""The two tiers: the library never imports the job tier (``distill.pipelines``), the CLI or the
package face; only the CLI, the face and the job tier itself import ``distill.pipelines``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "distill"
JOB_TIER = "distill.pipelines"
# May import the job tier: the entry points and the job tier itself.
ENTRY_POINTS = {"distill/__init__.py", "distill/__main__.py", "distill/cli.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, relative ones resolved; a
    ``from distill import x`` counts as importing ``distill.x`` (a name of the package face
    such as ``distill.distill`` counts as the face ``distill`` itself)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py")
                is_package = PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                module = candidate if is_module.is_file() or is_package.is_file() else base
                found.append((node.lineno, module))
    return found


def _library_files() -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if relative in ENTRY_POINTS or relative.startswith("distill/pipelines/"):
            continue
        files.append(path)
    return files


def test_the_package_has_a_library_and_a_job_tier():
    library = _library_files()
    jobs = sorted((PACKAGE / "pipelines").glob("*.py"))
    assert len(library) > 40 and len(jobs) >= 10


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_library_module_never_imports_the_job_tier(path):
    upward = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for line, module in _imported_modules(path)
        if module == "distill"
        or module == JOB_TIER
        or module.startswith(JOB_TIER + ".")
        or module == "distill.cli"
    ]
    assert not upward, upward


def test_the_import_walk_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a library file importing the job tier is caught, in each spelling."""
    fake = PACKAGE / "losses" / "_upward_probe.py"
    lines = [
        "from distill.pipelines.run import distill",
        "import distill.pipelines.eval",
        "from ..pipelines import run",
        "from distill import distill",
    ]
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "\n".join(lines))
    modules = [module for _, module in _imported_modules(fake)]
    assert modules == [
        "distill.pipelines.run",
        "distill.pipelines.eval",
        JOB_TIER + ".run",
        "distill",
    ]
