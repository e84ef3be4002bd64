"""Opus in a real browser: Debian's headless Chromium opens the page with `?codec=opus`, Chrome's fake
microphone plays Telugu speech, and the page's WebCodecs encoder and decoder (web/lib/opus.js) talk Opus with
the real server (loopback engine: what goes in comes out). Playwright watches the socket itself: the page
asked for Opus, the server confirmed it, both directions carry 0x03/0x04 packets, and what came back was
decoded and played."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, WebSocket, sync_playwright

from protocol import MAX_OPUS_PACKET_BYTES
from tests.support.chromium import CHROMIUM, chromium_flags
from tests.support.launcher import ServerProcess

POLL_MS = 50


class Wire:
    """What crossed the page's WebSocket, as Playwright saw it."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        self.controls: list[dict] = []

    def watch(self, ws: WebSocket) -> None:
        self.urls.append(ws.url)
        ws.on("framesent", lambda payload: isinstance(payload, bytes) and self.sent.append(payload))
        ws.on("framereceived", self._received)

    def _received(self, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            self.received.append(payload)
        else:
            self.controls.append(json.loads(payload))


@pytest.fixture(scope="module")
def browser(microphone_wav: Path) -> Iterator[Browser]:
    with sync_playwright() as pw:  # one per module: Playwright's sync API does not nest
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=chromium_flags(microphone_wav))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def opus_page(browser: Browser) -> Iterator[tuple[Page, Wire, ServerProcess]]:
    with ServerProcess("--engine", "loopback", "--max-sessions", "2") as server:
        page = browser.new_page()
        try:
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            wire = Wire()
            page.on("websocket", wire.watch)
            page.goto(server.url + "/?codec=opus&autostart=1")
            # Two seconds of Opus both ways, decoded and played by the page.
            page.wait_for_function("() => window.voiceAgent?.stats().framesReceived >= 100 && "
                                   "window.voiceAgent.stats().framesPlayed >= 50", timeout=30_000,
                                   polling=POLL_MS)
            assert not errors, errors
            yield page, wire, server
        finally:
            page.close()


def test_the_page_asks_for_opus_and_the_server_confirms(opus_page) -> None:
    _, wire, _ = opus_page
    assert wire.urls and wire.urls[0].endswith("/ws?codec=opus")
    start = next(m for m in wire.controls if m["type"] == "session_start")
    assert start["input"]["encoding"] == start["output"]["encoding"] == "opus"
    assert (start["input"]["prefix"], start["output"]["prefix"]) == (3, 4)
    assert not [m for m in wire.controls if m["type"] == "error"]


def test_opus_packets_both_ways_and_the_page_hears_them(opus_page) -> None:
    page, wire, _ = opus_page
    up, down = wire.sent[:100], wire.received[:100]
    assert up and all(f[0] == 0x03 and 2 <= len(f) <= MAX_OPUS_PACKET_BYTES + 1 for f in up)
    assert down and all(f[0] == 0x04 and 2 <= len(f) <= MAX_OPUS_PACKET_BYTES + 1 for f in down)
    # Far below PCM's 641 and 961 bytes a frame (24 and 32 kbit/s are 60 and 80 bytes a frame).
    assert sum(map(len, up)) / len(up) < 200
    assert sum(map(len, down)) / len(down) < 200
    stats = page.evaluate("window.voiceAgent.stats()")
    assert stats["framesReceived"] >= 100 and stats["framesPlayed"] >= 50
    assert stats["reconnects"] == 0


def test_the_page_says_which_codec_is_in_use(opus_page) -> None:
    page, _, _ = opus_page
    page.wait_for_function("() => document.getElementById('info-codec').textContent === 'Opus'",
                           timeout=10_000, polling=POLL_MS)


def test_without_webcodecs_the_page_falls_back_to_pcm(browser: Browser) -> None:
    with ServerProcess("--engine", "loopback", "--max-sessions", "1") as server:
        page = browser.new_page()
        try:
            page.add_init_script("delete window.AudioEncoder; delete window.AudioDecoder;")
            wire = Wire()
            page.on("websocket", wire.watch)
            page.goto(server.url + "/?codec=opus&autostart=1")
            page.wait_for_function("() => window.voiceAgent?.stats().framesReceived >= 50", timeout=30_000,
                                   polling=POLL_MS)
            page.wait_for_function("() => document.getElementById('info-codec').textContent === 'PCM'",
                                   timeout=10_000, polling=POLL_MS)
        finally:
            page.close()
    assert wire.urls and "codec" not in wire.urls[0]
    start = next(m for m in wire.controls if m["type"] == "session_start")
    assert start["input"]["encoding"] == "pcm_s16le"
    assert wire.sent and all(f[0] == 0x01 and len(f) == 641 for f in wire.sent[:50])
