"""distill: knowledge distillation for large language models.

The Python API and the CLI are two doors to one code path::

    import distill
    result = distill.distill({"train": {"steps": 100}})   # or a YAML path, or a RunConfig
    print(result.report["models"]["student_after"]["kl_to_teacher"])
"""

from distill.config import RunConfig, load_config
from distill.errors import DistillError
from distill.pipelines.module_run import ModuleResult, distill_module
from distill.pipelines.run import RunResult, distill

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
