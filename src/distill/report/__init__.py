"""Reports read a run's files (never the training code) and write report.json/.md and loss.png."""

from distill.report.build import build_report

__all__ = ["build_report"]
