"""Issue 19's acceptance in a real browser: the page talks to the real server (loopback engine: what goes in
comes out) through a TCP proxy (tests/support/proxy.py), the link is cut mid-conversation (both TCP sides
reset: no WebSocket close either way) and restored, and the page takes its conversation back.

What counts is read from structured data, never from logs: the page's own record of its sockets (an init
script wraps `WebSocket` and notes, on the page's clock, each socket's URL and the `session_start`s and
`error`s it received), the page's test hook, and the server's /metrics and /health.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.support.chromium import CHROMIUM, chromium_flags
from tests.support.helpers import metric, wait_for_sessions
from tests.support.launcher import ServerProcess, poll_until
from tests.support.proxy import TcpProxy

RESUME_WINDOW_S = 10
pytestmark = pytest.mark.loopback_server("--max-sessions", "2", "--resume-window", str(RESUME_WINDOW_S))

POLL_MS = 50
# Issue 19: the conversation goes on within 2 s of the network coming back.
RESUME_BUDGET_MS = 2000
# Frames of model audio the page receives before the cut and again after the resume (50 a second).
FRAMES_EACH_SIDE = 50

# Notes, in the page, what each socket the page opens asks for and is told (performance.now() times).
RECORD_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  const log = [];
  window.__sockets = log;
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      log.push({ event: 'connect', url: String(url), t: performance.now() });
      this.addEventListener('message', (event) => {
        if (typeof event.data !== 'string') return;
        const message = JSON.parse(event.data);
        if (message.type === 'session_start' || message.type === 'error') {
          log.push({ event: 'message', url: String(url), t: performance.now(), message });
        }
      });
      this.addEventListener('close', (event) => {
        log.push({ event: 'close', url: String(url), t: performance.now(), code: event.code });
      });
    }
  };
})();
"""


def wait_for_metric(server: ServerProcess, name: str, value: float, timeout_s: float = 10.0) -> None:
    took = poll_until(lambda: metric(server, name) == value, timeout_s)
    assert took is not None, f"{name} stayed {metric(server, name)}, expected {value}"


class ResumeRig:
    def __init__(self, page: Page, server: ServerProcess, proxy: TcpProxy) -> None:
        self.page = page
        self.server = server
        self.proxy = proxy
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def stats(self) -> dict:
        return self.page.evaluate("window.voiceAgent.stats()")

    def sockets(self) -> list[dict]:
        return self.page.evaluate("window.__sockets")

    def received(self, kind: str) -> list[dict]:
        """The page's record of each `kind` message (session_start, error) its sockets received."""
        return [e for e in self.sockets() if e["event"] == "message" and e["message"]["type"] == kind]

    def t(self, key: str) -> str:
        """The page's own text for `key` in its interface language now (web/i18n.js, the module it runs)."""
        return self.page.evaluate("async (k) => (await import('/i18n.js')).t(k)", key)

    def wait_for(self, condition: str, arg: object = None, timeout_s: float = 15.0) -> None:
        """Wait until the JS expression `condition` (a function of `arg`) is true in the page."""
        try:
            self.page.wait_for_function(condition, arg=arg, timeout=timeout_s * 1000, polling=POLL_MS)
        except Exception as error:
            raise AssertionError(
                f"{condition} not true within {timeout_s} s; stats: {json.dumps(self.stats())}; "
                f"sockets: {json.dumps(self.sockets())}; errors: {self.errors}\n"
                f"server log:\n{self.server.log()[-3000:]}"
            ) from error


@pytest.fixture(scope="module")
def rig(loopback_server: ServerProcess, microphone_wav: Path) -> Iterator[ResumeRig]:
    port = urlparse(loopback_server.url).port
    assert port
    with TcpProxy("127.0.0.1", port) as proxy, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=chromium_flags(microphone_wav))
        try:
            page = browser.new_page()
            page.add_init_script(RECORD_SOCKETS)
            rig = ResumeRig(page, loopback_server, proxy)
            page.goto(proxy.url("http", "/?autostart=1"))
            yield rig
        finally:
            browser.close()


def test_the_page_resumes_its_conversation_after_the_link_is_cut(rig: ResumeRig) -> None:
    server, proxy = rig.server, rig.proxy
    # Mid-conversation: the page speaks and hears the loopback's echo.
    rig.wait_for("n => window.voiceAgent?.stats().framesReceived >= n", FRAMES_EACH_SIDE, timeout_s=30)
    [first] = rig.received("session_start")
    start = first["message"]
    assert start["resumed"] is False and start["resume_window_s"] == RESUME_WINDOW_S
    assert re.fullmatch(r"[A-Za-z0-9_-]+", start["resume_token"]), start
    assert "resume" not in parse_qs(urlparse(first["url"]).query)

    assert proxy.cut() >= 1  # the page's socket (and any other connection it had open) reset both ways
    # The server noticed: the session is kept, detached, holding its slot.
    wait_for_metric(server, "voice_sessions_detached", 1)
    assert server.health()[1]["sessions_active"] == 1
    # The page noticed too, and tries to resume while the network is still down (each try reset).
    took = poll_until(lambda: proxy.refused >= 2, timeout=10)
    assert took is not None, f"the page tried {proxy.refused} times while the link was down"
    assert rig.stats()["resumes"] == 0

    restored_ms = rig.page.evaluate("performance.now()")  # just before: the gap measured is an upper bound
    proxy.restore()
    rig.wait_for("() => window.voiceAgent.stats().resumes >= 1", timeout_s=RESUME_WINDOW_S)

    starts = rig.received("session_start")
    assert len(starts) == 2, starts
    again = starts[1]
    resumed = again["message"]
    assert resumed["resumed"] is True and resumed["session_id"] == start["session_id"]
    assert isinstance(resumed["resume_gap_s"], float) and resumed["resume_gap_s"] > 0
    # It asked with the token of the first session_start and got a fresh one.
    assert parse_qs(urlparse(again["url"]).query)["resume"] == [start["resume_token"]]
    assert resumed["resume_token"] not in (None, start["resume_token"])
    gap_ms = again["t"] - restored_ms
    assert gap_ms < RESUME_BUDGET_MS, f"resumed {gap_ms:.0f} ms after the link came back"
    assert not rig.received("error")

    # The page says the conversation goes on (in its interface language, Telugu), and it does.
    assert rig.page.inner_text("#status") == rig.t("status.resumed")
    assert rig.page.get_attribute("#status", "data-state") == "live"
    stats = rig.stats()
    assert (stats["state"], stats["sessionId"], stats["resumeFailures"]) == ("live", start["session_id"], 0)
    heard = stats["framesReceived"] + FRAMES_EACH_SIDE
    rig.wait_for("n => window.voiceAgent.stats().framesReceived >= n", heard)

    # The server counted the resume and holds one session, attached again.
    assert metric(server, "voice_sessions_resumed_total") == 1
    assert metric(server, "voice_sessions_detached") == 0
    assert server.health()[1]["sessions_active"] == 1
    # Stop: the session ends and its slot is given back (none left detached either).
    rig.page.evaluate("window.voiceAgent.stop()")
    wait_for_sessions(server, 0)
    assert metric(server, "voice_sessions_detached") == 0
    assert not rig.errors, rig.errors
    # A timing for the record (pytest -s): how long the page took once the network was back.
    print(f"resumed {gap_ms:.0f} ms after restore (server gap {resumed['resume_gap_s']:.2f} s)")
