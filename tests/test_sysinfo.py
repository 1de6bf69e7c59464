"""Memory measurement: the high-water mark is per process, not inherited from the parent."""

from __future__ import annotations

import torch

from distill.evaluate.generation import GenerationSettings, measure_generation_in_subprocess
from distill.sysinfo import peak_rss_bytes


def test_peak_rss_rises_with_a_touched_allocation():
    before = peak_rss_bytes()
    block = torch.ones(64 * 2**20)  # 256 MiB, written so the pages are resident
    after = peak_rss_bytes()
    assert float(block[-1]) == 1.0
    assert after - before > 200 * 2**20


def test_child_peak_is_its_own(tiny_teacher_dir):
    """A child's peak stays below a parent that holds 1.5 GiB (ru_maxrss would inherit it)."""
    ballast = torch.ones(384 * 2**20)  # 1.5 GiB resident in the parent
    parent_peak = peak_rss_bytes()
    settings = GenerationSettings(["def f"], new_tokens=2, batch_sizes=(1,), runs=1, threads=1)
    result = measure_generation_in_subprocess(tiny_teacher_dir, settings)
    assert float(ballast[0]) == 1.0
    assert result["peak_rss_bytes"] < parent_peak - 1024 * 2**20
    assert result["threads"] == 1
