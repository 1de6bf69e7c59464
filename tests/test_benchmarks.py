"""The benchmark scripts still import: a refactor that moves a name they use breaks `make bench`
hours in; this catches it in the default suite (one subprocess, so their module-level settings
stay out of the test process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

IMPORT_ALL = """
import importlib, pathlib, sys
sys.path.insert(0, sys.argv[1])
failed = []
for script in sorted(pathlib.Path(sys.argv[1]).glob("*.py")):
    try:
        importlib.import_module(script.stem)
    except Exception as err:
        failed.append(f"{script.name}: {type(err).__name__}: {err}")
print("\\n".join(failed))
"""


def test_every_benchmark_script_imports():
    scripts = sorted(BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 10  # the scripts are where this test looks for them
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, str(BENCHMARKS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", done.stdout
