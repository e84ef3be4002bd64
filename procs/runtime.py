"""What every child process does first: logging with context, signals, dying with its parent."""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s [%(processName)s] %(name)s: %(message)s"
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
PROCESS_NAME_PREFIX = "voice-"  # a child's name in /proc/PID/comm, ps and top: voice-network, voice-vad, ...


def process_name(role: str) -> str:
    """The name a child process of `role` carries (at most 15 bytes: the kernel's limit)."""
    return (PROCESS_NAME_PREFIX + role)[:15]


class RedactSecrets(logging.Filter):
    """Access tokens travel in the URL's query (`?token=...`, the one place a browser can put them), and
    websockets' debug log prints request lines: every record is scrubbed before any handler writes it."""

    PATTERN = re.compile(r"(token=)[^\s&\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self.PATTERN.sub(r"\1<redacted>", message), None
        return True


class SessionContext(logging.Filter):
    """Lines about a session say so the one way this project writes it, `session=<id> slot=<n>` (in the
    text format, that is the context); for the JSON format those become the fields `session` and `slot`, so
    a log collector can select one conversation without parsing messages."""

    SESSION = re.compile(r"\bsession=([^\s:,;]+)")
    SLOT = re.compile(r"\bslot=(\d+)")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (session := self.SESSION.search(message)) is not None:
            record.session = session.group(1)
        if (slot := self.SLOT.search(message)) is not None:
            record.slot = int(slot.group(1))
        return True


def json_formatter() -> logging.Formatter:
    """One JSON object a line: time (ISO 8601, UTC), level, process, logger, message, and session and slot
    where a line is about one; exceptions as `exc_info`."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(levelname)s %(processName)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "processName": "process", "name": "logger"},
        timestamp="time",
        json_ensure_ascii=False,  # Telugu text stays readable
    )


def setup_logging(level: str, log_format: str = "text") -> None:
    """Every process's logging: to stderr, secrets redacted, as text (the default) or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json"
                         else logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(RedactSecrets())
    handler.addFilter(SessionContext())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def setup_child(level: str, on_term: Callable[[], None],
                on_stop_now: Callable[[], None] | None = None, log_format: str = "text") -> None:
    """Children leave Ctrl-C to the supervisor (the terminal sends SIGINT to the whole process group),
    stop cleanly on SIGTERM, and stop at once on SIGUSR1 (`on_stop_now`, where the process distinguishes a
    drain from a stop). If the supervisor dies without telling them, they get the stop-at-once signal."""
    setup_logging(level, log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: on_term())
    death_signal = signal.SIGTERM
    if on_stop_now is not None:
        signal.signal(signal.SIGUSR1, lambda *_: on_stop_now())
        death_signal = signal.SIGUSR1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown path still applies
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        (on_stop_now or on_term)()


def run_process(role: str, *args: object) -> None:
    """Spawn target: import `procs.<role>.main` in the child and run its `main(*args)`. The supervisor names
    its children this way so that it never imports what they need (torch, moshi, onnxruntime) itself.
    The child is named after its role (`voice-inference`), so an operator's `ps` and the test tools tell the
    children apart without reading any log."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(process_name(role).encode()), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: unnamed, nothing else changes
        pass
    try:
        importlib.import_module(f"procs.{role}.main").main(*args)
    except Exception:
        # Through logging, so a crash is one record in the configured format (a JSON line with
        # --log-format json), not multiprocessing's raw traceback on stderr; the supervisor sees status 1.
        logging.getLogger(role).exception("%s crashed", role)
        sys.exit(1)


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
