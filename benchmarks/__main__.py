"""`python -m mctlib.bench`: the bench's entry point (also how its child processes start)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
