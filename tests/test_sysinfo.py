"""Memory measurement: the high-water mark is per process, not inherited from the parent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.evaluate.generation import GenerationSettings, measure_generation_in_subprocess
from distill.sysinfo import peak_rss_bytes


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_peak_rss_rises_with_a_touched_allocation():
    """The high-water mark reaches what is resident now plus a fresh block.

    Earlier tests in the same worker may have left the peak above the current resident set, so
    the block is sized to pass that old peak by 256 MiB rather than assumed to raise it.
    """
    peak_before = peak_rss_bytes()
    resident_before = _resident_bytes()
    block_bytes = (peak_before - resident_before) + 256 * 2**20
    block = torch.ones(block_bytes // 4)  # float32, written so the pages are resident
    peak_after = peak_rss_bytes()
    assert float(block[-1]) == 1.0
    assert peak_after > peak_before + 200 * 2**20
    assert peak_after >= resident_before + block_bytes - 64 * 2**20


def test_child_peak_is_its_own(tiny_teacher_dir):
    """A child's peak stays below a parent that holds 1.5 GiB (ru_maxrss would inherit it)."""
    ballast = torch.ones(384 * 2**20)  # 1.5 GiB resident in the parent
    parent_peak = peak_rss_bytes()
    settings = GenerationSettings(["def f"], new_tokens=2, batch_sizes=(1,), runs=1, threads=1)
    result = measure_generation_in_subprocess(tiny_teacher_dir, settings)
    assert float(ballast[0]) == 1.0
    assert result["peak_rss_bytes"] < parent_peak - 1024 * 2**20
    assert result["threads"] == 1
