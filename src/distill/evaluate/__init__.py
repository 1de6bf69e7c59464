"""Evaluation: held-out quality against the teacher, generation speed, multiple choice."""

from distill.evaluate.heldout import heldout_metrics

__all__ = ["heldout_metrics"]
