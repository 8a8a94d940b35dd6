"""`python -m services.generation --config FILE [overrides]` (same as `aligner serve generation`)."""

import sys

from services.generation.server import main

sys.exit(main(sys.argv[1:]))
