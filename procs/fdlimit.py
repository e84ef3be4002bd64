"""Open files (sockets, shared-memory segments, pipes) against the process's limit.

Every session holds a socket in the network process, and every ring a descriptor in each process that maps
it; a box's default soft limit (often 1,024) runs out below a few hundred sessions. Past it, accept() fails:
newcomers get no answer at all, and neither does `/health`, so an orchestrator would kill a server busy
with hundreds of live sessions. So the supervisor raises the soft limit to the hard one at start (its
children inherit it) and refuses to start when even that cannot hold `--max-sessions`; the network process
refuses a newcomer with `capacity` while fewer than `RESERVE_FDS` descriptors would be left, so `/health`,
`/livez`, `/metrics` and the agent check always have room.
"""

from __future__ import annotations

import contextlib
import os
import resource
from typing import Final

RESERVE_FDS: Final = 64  # health and metrics requests, the agent check, refusals in flight, log files
FDS_PER_SESSION: Final = 1  # its socket, in the network process
# An unlimited hard limit is not a valid soft one for RLIMIT_NOFILE (the kernel caps it at fs.nr_open).
_UNLIMITED_TARGET: Final = 1 << 20


def open_fds() -> int:
    """Descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:  # no /proc: nothing to count against
        return 0


def soft_limit() -> int:
    """The soft limit; an unlimited one (RLIM_INFINITY, -1 in Python) as a number larger than any need."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def raise_soft_limit() -> int:
    """The soft limit raised as far as the hard one allows; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # fs.nr_open below the hard limit: keep what we have
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft_limit()


def room_for_a_session() -> bool:
    """Does the reserve stay free with the newcomer's descriptors (its socket, open already) counted?"""
    return open_fds() + RESERVE_FDS <= soft_limit()
