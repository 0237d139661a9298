"""mctlib: Matching Convexified Trajectory dataset distillation (Zhong et al., CVPR 2025)."""

import os

__version__ = "0.1.0"

# Machines with at most this many cores are "small": torch's busy-waiting OpenMP threads collapse
# there as soon as another process shares the cores (book/performance.md, "Threads"). Read by
# `device.configure_threads` and by the command line before torch loads (so it lives here, free
# of imports beyond `os`).
SMALL_MACHINE_CORES = 2


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, which follows
    `taskset` and most container limits; else `os.cpu_count()`). Free of imports beyond `os`."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
