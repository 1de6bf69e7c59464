"""distill: knowledge distillation for large language models.

The Python API and the CLI are two doors to one code path::

    import distill
    result = distill.distill({"train": {"steps": 100}})   # or a YAML path, or a RunConfig
    print(result.report["models"]["student_after"]["kl_to_teacher"])
"""

from __future__ import annotations

import importlib
from typing import Any

from distill.config import RunConfig, load_config
from distill.errors import DistillError

__all__ = [
    "DistillError",
    "ModuleResult",
    "RunConfig",
    "RunResult",
    "distill",
    "distill_module",
    "load_config",
]
__version__ = "0.1.0"

# The jobs load torch and transformers: imported on first use, so `import distill` and
# `distill config` stay light, and the CLI sets up logging before anything heavy is imported.
_JOBS = {
    "distill": "distill.pipelines.run",
    "RunResult": "distill.pipelines.run",
    "distill_module": "distill.pipelines.module_run",
    "ModuleResult": "distill.pipelines.module_run",
}


def __getattr__(name: str) -> Any:
    if name in _JOBS:
        return getattr(importlib.import_module(_JOBS[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
