"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). ru_maxrss would also count the parent's peak, which Linux carries into
    a forked child across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
