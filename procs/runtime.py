"""What every child process does first: logging with context, signals, dying with its parent."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s [%(processName)s] %(name)s: %(message)s"
_PR_SET_PDEATHSIG = 1


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr, force=True
    )


def setup_child(level: str, on_term: Callable[[], None]) -> None:
    """Children leave Ctrl-C to the supervisor (the terminal sends SIGINT to the whole process group),
    stop cleanly on SIGTERM, and get SIGTERM themselves if the supervisor dies without telling them."""
    setup_logging(level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: on_term())
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown path still applies
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        on_term()


def run_process(role: str, *args: object) -> None:
    """Spawn target: import `procs.<role>.main` in the child and run its `main(*args)`. The supervisor names
    its children this way so that it never imports what they need (torch, moshi, onnxruntime) itself."""
    importlib.import_module(f"procs.{role}.main").main(*args)


class LogThrottle:
    """At most one log line per key per `period_s`; says how many were held back meanwhile.

    A flood (a full ring, a misbehaving peer) must not flood the log: `allow` returns None while the key
    is quiet, else the number of lines suppressed since the last one that was written."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def allow(self, key: object, now: float) -> int | None:
        last = self._last.get(key)
        if last is not None and now - last < self.period_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)
