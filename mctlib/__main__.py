import os
import sys

from . import SMALL_MACHINE_CORES

# Before torch loads (OpenMP reads the policy once, at load): on a small machine, let idle OpenMP
# threads sleep instead of spinning, so `device.configure_threads` can use every core without
# collapsing when another process shares them. Measured, MTT unrolled on 2 cores: 1.68 s/iteration
# idle and 2.88 s beside another torch job, against 2.36 and 3.00 s on one thread and 1.36 and
# 38 s busy-waiting on two (book/performance.md). A policy the user set is kept.
if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402  (after the environment is set)

sys.exit(main())
