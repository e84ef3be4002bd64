"""What reaches the log from a client: no token under any spelling, no forged line, no forged context
(procs/runtime.py: SessionContext, SafeText), in both formats, through the handler every process uses."""

from __future__ import annotations

import io
import json
import logging

import pytest

from procs.runtime import log_handler

TOKEN = "v1.1765000000.3f9a0c1d2e"


def logged(log_format: str, template: str, *args: object, name: str = "websockets.server") -> str:
    stream = io.StringIO()
    logger = logging.getLogger(f"test-logging.{name}")
    logger.propagate = False
    logger.handlers = [log_handler(stream, log_format)]
    logger.setLevel(logging.DEBUG)
    try:
        logger.debug(template, *args)
    finally:
        logger.handlers = []
    return stream.getvalue()


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("path", [
    f"/ws?token={TOKEN}",
    f"/ws?tok%65n={TOKEN}",  # the server decodes parameter names: so must the redaction
    f"/ws?codec=opus&%74oken={TOKEN}",
    f"/api/chat?auth_id={TOKEN}&text_temperature=0.7",  # kyutai's browsers' name for it
    f"/ws?TOKEN={TOKEN}",
    f"/ws?x=1&token+={TOKEN}",
])
def test_a_token_is_not_logged_under_any_spelling(log_format: str, path: str) -> None:
    line = logged(log_format, "< GET %s HTTP/1.1", path)
    assert TOKEN not in line and "<redacted>" in line, line


def test_harmless_query_values_stay_readable() -> None:
    line = logged("text", "< GET %s HTTP/1.1", "/api/chat?text_temperature=0.7&codec=opus")
    assert "text_temperature=0.7&codec=opus" in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_carriage_return_or_newline_from_a_client_cannot_forge_a_line(log_format: str) -> None:
    forged = "/x\r\n12:00:00.000 ERROR   [MainProcess] supervisor: inference[1] killed by SIGKILL"
    out = logged(log_format, "< GET %s HTTP/1.1", forged)
    assert out.count("\n") == 1 and "\r" not in out, repr(out)
    if log_format == "json":
        assert json.loads(out)["message"].startswith("< GET /x\\r\\n12:00")


@pytest.mark.parametrize("text", ["session=evil slot=7", "x session=evil slot=7 y", "session=evil"])
def test_client_text_that_says_session_and_slot_sets_no_context(text: str) -> None:
    record = json.loads(logged("json", "< User-Agent: %s", text))
    assert "session" not in record and "slot" not in record, record
    # A line of ours about a session, carrying the client's text, keeps our context, not the client's.
    record = json.loads(logged("json", "session=%s slot=%d: open from %s", "a1b2", 3, text, name="network"))
    assert (record["session"], record["slot"]) == ("a1b2", 3), record


def test_our_session_lines_carry_their_context_in_both_formats() -> None:
    record = json.loads(logged("json", "session=%s slot=%d: ended (%s)", "f00d", 2, "client_closed",
                               name="network"))
    assert (record["session"], record["slot"], record["message"]) == (
        "f00d", 2, "session=f00d slot=2: ended (client_closed)")
    assert "session=f00d slot=2: ended (client_closed)" in logged("text", "session=%s slot=%d: ended (%s)",
                                                                 "f00d", 2, "client_closed")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_traceback_that_quotes_a_request_line_is_redacted(log_format: str) -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test-logging.traceback")
    logger.propagate = False
    logger.handlers = [log_handler(stream, log_format)]
    logger.setLevel(logging.DEBUG)
    try:
        raise ValueError(f"unsupported protocol; expected HTTP/1.1: GET /ws?token={TOKEN} HTTP/2.0")
    except ValueError:
        logger.debug("! no valid HTTP request", exc_info=True)
    finally:
        logger.handlers = []
    out = stream.getvalue()
    assert TOKEN not in out and "<redacted>" in out and "ValueError" in out, out


@pytest.mark.parametrize("header", ["Authorization: Bearer " + TOKEN, "Cookie: session=" + TOKEN,
                                    "Proxy-Authorization: Basic " + TOKEN])
def test_credential_headers_are_not_logged(header: str) -> None:
    name, value = header.split(": ", 1)
    line = logged("text", "< %s: %s", name, value)
    assert TOKEN not in line and f"< {name}: <redacted>" in line, line
