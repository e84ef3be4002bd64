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
from typing import TextIO
from urllib.parse import unquote_plus

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)-7s [%(processName)s] %(name)s: %(message)s"
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
PROCESS_NAME_PREFIX = "voice-"  # a child's name in /proc/PID/comm, ps and top: voice-network, voice-vad, ...


def process_name(role: str) -> str:
    """The name a child process of `role` carries (at most 15 bytes: the kernel's limit)."""
    return (PROCESS_NAME_PREFIX + role)[:15]


class SessionContext(logging.Filter):
    """Lines about a session say so the one way this project writes it, a template with `session=%s` and
    `slot=%d` (in the text format, that is the context); for the JSON format those become the fields
    `session` and `slot`, so a log collector can select one conversation without parsing messages.

    They are taken from the code's own template and the argument it put there, never from the text a line
    ends up with: a client's path, header or text frame that says `session=... slot=...` sets nothing."""

    SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")

    def filter(self, record: logging.LogRecord) -> bool:
        template, args = record.msg, record.args
        if not isinstance(template, str) or "session=" not in template or not isinstance(args, tuple):
            return True
        index = 0
        for spec in self.SPEC.finditer(template):
            if spec.group(1) == "%":
                continue
            if index >= len(args):
                break
            before = template[: spec.start()]
            if before.endswith("session=") and not hasattr(record, "session"):
                record.session = str(args[index])
            elif before.endswith("slot=") and isinstance(args[index], int) and not hasattr(record, "slot"):
                record.slot = int(args[index])
            index += 1
        return True


class SafeText(logging.Filter):
    """What a client controls reaches the log only as inert text.

    * Secrets: access tokens travel in the URL's query (`?token=...`, the one place a browser can put them)
      and websockets' debug log prints request lines. Every query string in a line is read the way the
      server reads it (names percent-decoded), and every value whose name is not a known harmless one
      (`codec`, moshi's sampling settings) is replaced, so `?tok%65n=...` or a token under another name
      (`auth_id`) is not written either.
    * The values of credential headers (`Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie`) in
      websockets' request and response lines are replaced too.
    * Control characters (CR, LF, ...) in a line are escaped, so text from a path, a header or a text frame
      cannot forge a line of its own.
    * A traceback (an exception's message may quote a request line) is rendered here, redacted the same
      way, and handed to the formatter as the record's text instead of the exception."""

    QUERY = re.compile(r"\?([^\s\"'<>]*)")
    CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
    HARMLESS = frozenset({"codec", "text_temperature", "text_topk", "audio_temperature", "audio_topk",
                          "pad_mult", "repetition_penalty_context", "repetition_penalty", "text_seed",
                          "audio_seed"})

    CREDENTIAL_HEADER = re.compile(r"^([<>] )?(authorization|proxy-authorization|cookie|set-cookie):\s*.*$",
                                   re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), message)
        clean = self._redact_urls(self.CREDENTIAL_HEADER.sub(r"\1\2: <redacted>", clean))
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = self._redact_urls(text), None
        elif record.exc_text:
            record.exc_text = self._redact_urls(record.exc_text)
        return True

    def _redact_urls(self, text: str) -> str:
        if "?" not in text or "=" not in text:
            return text
        return self.QUERY.sub(lambda m: "?" + self._redact(m.group(1)), text)

    def _redact(self, query: str) -> str:
        pairs = []
        for pair in query.split("&"):
            name, eq, _ = pair.partition("=")
            harmless = unquote_plus(name).strip().lower() in self.HARMLESS
            pairs.append(pair if not eq or harmless else f"{name}=<redacted>")
        return "&".join(pairs)


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


def log_handler(stream: TextIO, log_format: str = "text") -> logging.Handler:
    """The handler every process logs through: context fields, secrets redacted, text or JSON lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter() if log_format == "json"
                         else logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(SessionContext())  # first: it reads the template, before SafeText formats the line
    handler.addFilter(SafeText())
    return handler


def setup_logging(level: str, log_format: str = "text") -> None:
    """Every process's logging: to stderr, secrets redacted, as text (the default) or JSON lines."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(sys.stderr, log_format)], force=True)


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
