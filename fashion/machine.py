"""What the machine lends this process, asked the same way by training and serving."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup cpusets, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
