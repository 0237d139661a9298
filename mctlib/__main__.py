import os
import sys

from . import SMALL_MACHINE_CORES, available_cores

# Before torch loads (OpenMP reads the policy once, at load): on a small machine, let idle OpenMP
# threads sleep instead of spinning, so `device.configure_threads` can use every core without
# collapsing when another process shares them. Measured (book/performance.md, bench run 3), MTT
# unrolled on 2 cores, idle / with both cores contended: two passive threads 2.05 / 3.07 s per
# iteration, one thread 2.77 / 3.73 s, two busy-waiting threads 1.45 / 9.46 s. A policy the user
# set is kept.
if available_cores() <= SMALL_MACHINE_CORES:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402  (after the environment is set)

sys.exit(main())
