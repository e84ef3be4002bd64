"""The launch script from a checkout: `python supervisor.py [FLAGS]` runs the server, as `voice-agent serve`
does once installed. The supervisor itself (the processes, the rings, restarts, stopping) is
procs/supervisor.py; this file is not installed."""

import sys

from procs.supervisor import main

if __name__ == "__main__":
    sys.exit(main())
