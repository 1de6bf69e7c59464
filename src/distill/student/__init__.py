"""Students from the teacher: depth (fixed or searched layers), width (Minitron-style slicing),
and their cost against the teacher.

``select_layers`` / ``build_student``: a fixed layer recipe; ``search_layers``: layers chosen on
calibration blocks (shortgpt, angular, greedy_kl); ``prune_width``: heads, MLP and hidden
channels by activation importance; ``make_student``: all of it from a ``StudentConfig``;
``build_vocabulary`` / ``resize_vocabulary``: a vocabulary of the student's own, its rows
initialised from the teacher's.
"""

from distill.student.build import (
    StudentBuild,
    flops_per_token,
    make_student,
    model_cost,
    needs_calibration,
)
from distill.student.depth import (
    SUPPORTED_MODEL_TYPES,
    build_student,
    check_supported,
    select_layers,
)
from distill.student.search import calibration_blocks, search_layers
from distill.student.vocab import (
    build_vocabulary,
    initial_rows,
    load_vocabulary,
    resize_vocabulary,
    row_sources,
)
from distill.student.width import WidthTargets, measure_importance, prune_width

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "StudentBuild",
    "WidthTargets",
    "build_student",
    "calibration_blocks",
    "check_supported",
    "flops_per_token",
    "initial_rows",
    "load_vocabulary",
    "make_student",
    "measure_importance",
    "model_cost",
    "needs_calibration",
    "prune_width",
    "resize_vocabulary",
    "row_sources",
    "search_layers",
    "select_layers",
    "build_vocabulary",
]
