"""`python -m benchmarks`: the bench's entry point (also how its child processes start)."""

import os
import sys

from mctlib import SMALL_MACHINE_CORES, available_cores

# What `python -m mctlib` sets up before torch loads (mctlib/__main__.py), so that the bench measures the
# command line as a user runs it. A child process keeps the environment its parent gave it.
if "--child" not in sys.argv and available_cores() <= SMALL_MACHINE_CORES:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402  (after the environment is set)

sys.exit(main(sys.argv[1:]))
