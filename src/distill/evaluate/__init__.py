"""Evaluation: held-out quality against the teacher, and generation speed / memory."""

from distill.evaluate.heldout import heldout_metrics
from distill.evaluate.speed import measure_in_subprocess, weights_bytes

__all__ = ["heldout_metrics", "measure_in_subprocess", "weights_bytes"]
