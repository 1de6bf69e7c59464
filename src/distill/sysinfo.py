"""Process measurements shared by training (the plan) and evaluation (per-model memory)."""

from __future__ import annotations

import resource
from pathlib import Path

__all__ = ["peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark in bytes.

    Linux ``VmHWM`` from /proc/self/status; ``ru_maxrss`` is only the fallback because a child
    process inherits its parent's value across fork + exec.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
