"""`python -m procs ...` is `voice-agent ...`."""

import sys

from procs.cli import main

sys.exit(main())
