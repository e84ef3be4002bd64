"""Issue 4's acceptance in a real browser: Debian's headless Chromium opens the page that the real server
serves, with Chrome's fake microphone playing Telugu speech from espeak-ng (looped), and talks to the default
engine (the moshi demo checkpoint, random weights) through the real supervisor, VAD and inference processes.

The tests share one server and one page (module scope) and run in file order: the last one restarts the
server under the page. Screenshots go to artifacts/ (git-ignored); UPDATE_SCREENSHOT=1 also refreshes
docs/screenshot.png for the README.

The page speaks Telugu by default (issue 12): its text must render with the Noto Sans Telugu it serves from
web/fonts/, not with whatever Telugu font the machine has (this one has several) and not as tofu; the
English toggle is remembered across visits; the quality panel shows the server's figures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Response, sync_playwright

from tests.support.chromium import CHROMIUM, chromium_flags
from tests.support.launcher import ServerProcess

SERVER_ARGS = ("--max-sessions", "2", "--drain-timeout", "1")  # a restart: SIGTERM, a 1 s drain
FRAMES_PER_SECOND = 50
RATE_WINDOW_FRAMES = 200  # 4 s of microphone frames: a one-frame burst moves the rate by 0.25/s
# The page's back-off is capped at 3 s (web/app.js); the rest is its handshake and first frames, with room
# for a loaded machine (the new server is still warming up meanwhile).
RECONNECT_BUDGET_S = 10.0
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "screenshot.png"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
POLL_MS = 50
# The latency monitor's value cells: round trip, server processing, playback buffer, mouth-to-ear.
MONITOR_VALUES = ("#lat-rtt", "#lat-server", "#lat-buffer", "#lat-total")
NUMBER_MS = re.compile(r"\d+(?:\.\d+)? ms")
TELUGU = re.compile(r"[\u0C00-\u0C7F]")
SERVED_FAMILY = "Noto Sans Telugu"
SERVED_FONT = "/fonts/NotoSansTelugu-Regular.ttf"
# The @font-face unicode-range in web/style.css: what the served face draws.
SERVED_RANGE = re.compile(r"[\u0951\u0952\u0964\u0965\u0C00-\u0C7F\u1CDA\u200C\u200D\u25CC]")
# Elements with Telugu interface text of their own (and of both weights: h1 and buttons are bold).
TELUGU_UI = ("h1", "#start", "#status", "#conversation-heading", "#quality-heading", "#latency-heading")
# The quality panel's value cells and what each shows once the server sends `latency.quality`.
QUALITY_VALUES = {
    "#q-level": r"^-?\d+ dBFS$",
    "#q-snr": r"^-?\d+ dB$",
    "#q-loss": r"^\d+\.\d %$",
    "#q-spikes": r"^\d+$",
    "#q-drops": r"^\d+$",
}


def frames_in_total(server: ServerProcess) -> float:
    """The server's count of client audio frames received, from GET /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        body = response.read().decode()
    match = re.search(r"^voice_frames_in_total (\S+)$", body, re.MULTILINE)
    assert match, body
    return float(match.group(1))


class BrowserRig:
    """One server and one page on it; the server can be replaced on the same port under the page."""

    def __init__(self, playwright: Playwright, microphone_wav: Path) -> None:
        self.server = ServerProcess(*SERVER_ARGS)
        self.browser: Browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_flags(microphone_wav)
        )
        # One context (one profile: localStorage) for the page and any later visit to the same site.
        self.context: BrowserContext = self.browser.new_context(viewport=DESKTOP)
        self.page: Page = self.context.new_page()
        self.page_errors: list[str] = []
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        # (url, status, content type) of everything the page fetched: the font must come from the server.
        self.responses: list[tuple[str, int, str]] = []
        self.page.on("response", self.log_response)

    def log_response(self, response: Response) -> None:
        self.responses.append((response.url, response.status, response.headers.get("content-type", "")))

    def stats(self) -> dict:
        return self.page.evaluate("window.voiceAgent.stats()")

    def t(self, key: str, params: dict | None = None) -> str:
        """The page's own text for `key` in its interface language now (web/i18n.js, the module it runs)."""
        return self.page.evaluate("async ([k, p]) => (await import('/i18n.js')).t(k, p)", [key, params or {}])

    def wait_for(self, condition: str, arg: object = None, timeout_s: float = 15.0) -> None:
        """Wait until the JS expression `condition` (a function of `arg`) is true in the page."""
        try:
            self.page.wait_for_function(condition, arg=arg, timeout=timeout_s * 1000, polling=POLL_MS)
        except Exception as error:
            try:
                stats = json.dumps(self.stats())
            except Exception as why:  # the page itself is broken (no test hook): say so instead
                stats = f"unavailable ({why})"
            raise AssertionError(
                f"{condition} not true within {timeout_s} s; stats: {stats}; errors: {self.page_errors}\n"
                f"server log:\n{self.server.log()[-3000:]}"
            ) from error

    def wait_frames_sent(self, at_least: int, timeout_s: float = 15.0) -> None:
        self.wait_for("n => window.voiceAgent.stats().framesSent >= n", at_least, timeout_s)

    def stop_server(self) -> tuple[int, float]:
        """SIGTERM the server; returns (exit code, seconds it took to stop)."""
        code, took = self.server.stop()
        self.server.__exit__(None, None, None)
        return code, took

    def start_server_on_the_same_port(self) -> ServerProcess:
        port = urlparse(self.server.url).port
        assert port
        self.server = ServerProcess("--port", str(port), *SERVER_ARGS)
        return self.server

    def close(self) -> None:
        self.browser.close()
        self.server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def rig(demo_checkpoint: str, microphone_wav: Path) -> Iterator[BrowserRig]:
    with sync_playwright() as playwright:
        rig = BrowserRig(playwright, microphone_wav)
        try:
            rig.page.goto(rig.server.url + "/?autostart=1")
            rig.wait_for("() => window.voiceAgent?.stats().state === 'live'")
            yield rig
        finally:
            rig.close()


def test_page_connects_and_goes_live(rig: BrowserRig) -> None:
    stats = rig.stats()
    assert stats["connected"] is True
    assert stats["sessionId"]
    assert stats["demoWeights"] is True
    assert rig.page.get_attribute("#status", "data-state") == "live"
    assert rig.page.is_visible("#demo-banner")
    assert rig.page.is_disabled("#start") and rig.page.is_enabled("#stop")
    assert not rig.page_errors


def rendered_fonts(page: Page, selector: str) -> list[dict]:
    """The fonts Chromium actually drew `selector`'s text with (DevTools' "Rendered Fonts"):
    [{familyName, postScriptName, isCustomFont, glyphCount}]."""
    cdp = page.context.new_cdp_session(page)
    try:
        cdp.send("DOM.enable")
        cdp.send("CSS.enable")
        root = cdp.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        assert node, selector
        return cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    finally:
        cdp.detach()


def test_interface_is_telugu_in_the_served_font_without_tofu(rig: BrowserRig) -> None:
    page = rig.page
    assert page.get_attribute("html", "lang") == "te"
    assert page.inner_text("#start") == "ప్రారంభించండి" and page.inner_text("#stop") == "ఆపండి"
    assert page.title() == "తెలుగు వాయిస్ ఏజెంట్"
    assert TELUGU.search(page.inner_text("#status")), page.inner_text("#status")  # live: in Telugu
    assert page.inner_text("#demo-banner").startswith("డెమో చెక్‌పాయింట్")
    assert page.get_attribute("#transcript", "lang") == "te"
    assert page.get_attribute("#lang-toggle", "lang") == "en" and page.inner_text("#lang-toggle") == "English"

    fonts = page.evaluate(
        """async ([family, ids]) => {
            await document.fonts.ready;
            const faces = [...document.fonts].filter((f) => f.family.replace(/["']/g, '') === family);
            const texts = ids.map((s) => document.querySelector(s).innerText);
            const letters = [...new Set(texts.join('').match(/[\\u0C05-\\u0C39]/g))];
            return {
                faces: faces.map((f) => ({status: f.status, weight: f.weight, range: f.unicodeRange})),
                checks: texts.map((text) => document.fonts.check(`16px "${family}"`, text)),
                checkBold: document.fonts.check(`bold 16px "${family}"`, texts.join('')),
                families: ids.map((s) => getComputedStyle(document.querySelector(s)).fontFamily),
                letters: letters.length,
            };
        }""",
        [SERVED_FAMILY, list(TELUGU_UI)],
    )
    print(fonts)
    # Both served faces (regular and bold) were loaded by the page's own Telugu text.
    assert sorted(face["weight"] for face in fonts["faces"]) == ["100 500", "600 900"], fonts["faces"]
    assert all(face["status"] == "loaded" for face in fonts["faces"]), fonts["faces"]
    assert all(fonts["checks"]) and fonts["checkBold"], fonts
    for selector, family in zip(TELUGU_UI, fonts["families"], strict=True):
        assert family.startswith(f'"{SERVED_FAMILY}"'), (selector, family)
    assert fonts["letters"] >= 20, fonts  # the interface text really is Telugu, in many letters

    # Fetched from this server, as a font.
    fetched = [(status, ctype) for url, status, ctype in rig.responses if url == rig.server.url + SERVED_FONT]
    assert fetched and fetched[0] == (200, "font/ttf"), rig.responses
    assert any(url.endswith("/fonts/NotoSansTelugu-Bold.ttf") and status == 200
               for url, status, _ in rig.responses), rig.responses

    # What Chromium drew with: the served face for every Telugu glyph. Installed fonts (this machine has
    # several Telugu ones, Noto Sans Telugu among them) drew only the characters outside the face's
    # unicode-range (spaces, punctuation, Latin): at most one glyph each, none for a Telugu letter.
    for selector in TELUGU_UI:
        used = rendered_fonts(page, selector)
        custom = [f for f in used if f["isCustomFont"]]
        assert [f["familyName"] for f in custom] == [SERVED_FAMILY], (selector, used)
        assert custom[0]["glyphCount"] > 0, (selector, used)
        text = page.inner_text(selector).strip()
        outside = sum(1 for c in text if c != "\n" and not SERVED_RANGE.match(c))
        others = sum(f["glyphCount"] for f in used if not f["isCustomFont"])
        print(selector, repr(text), outside, used)
        assert others <= outside, (selector, text, used)
    assert not rig.page_errors


QUALITY_SHOWN = "(cells) => cells.every(([s, r]) => new RegExp(r).test(document.querySelector(s).innerText))"


def test_quality_panel_shows_the_sessions_figures(rig: BrowserRig) -> None:
    page = rig.page
    # The level, loss, spikes and drops come with the first `latency.quality`; the SNR once the VAD has
    # heard both speech and silence (the looped conversation has both within seconds).
    rig.wait_for(QUALITY_SHOWN, list(QUALITY_VALUES.items()), timeout_s=30)
    shown = {selector: page.inner_text(selector) for selector in QUALITY_VALUES}
    quality = rig.stats()["quality"]
    print(shown, quality)
    assert quality is not None
    assert -120 <= float(shown["#q-level"].split()[0]) <= 0
    # The meter shows the level on its -60..0 dBFS scale (read with the text, in one refresh).
    level, meter = page.evaluate(
        "() => [parseFloat(document.getElementById('q-level').innerText),"
        " document.getElementById('q-level-meter').value]"
    )
    assert abs(meter - max(-60.0, min(0.0, level))) <= 0.5, (level, meter)
    assert re.match(r"^గరిష్ఠం -?\d+ dBFS · క్లిప్పింగ్ \d+\.\d %$", page.inner_text("#q-level-detail"))
    # Advice: "no problems", or each warning as Telugu a person can act on.
    warnings = page.eval_on_selector_all("#q-warnings li",
                                         "lis => lis.map((li) => [li.dataset.warning, li.innerText])")
    if warnings:
        for name, text in warnings:
            assert name in quality["warnings"] and TELUGU.search(text) and text != name, warnings
    else:
        assert page.inner_text("#q-summary") == "సమస్యలు లేవు."
    assert not rig.page_errors


def test_english_toggle_switches_everything_and_is_remembered(rig: BrowserRig) -> None:
    page = rig.page
    page.click("#lang-toggle")
    page.wait_for_function("() => document.documentElement.lang === 'en'")
    assert page.inner_text("#start") == "Start" and page.inner_text("#stop") == "Stop"
    assert page.title() == "Telugu voice agent"
    assert page.inner_text("#status").startswith("Connected"), page.inner_text("#status")
    assert page.inner_text("#demo-banner") == "Demo checkpoint — random weights, output is noise"
    assert page.inner_text("#quality-heading") == "Audio quality"
    assert page.inner_text("#latency-heading") == "Latency"
    assert page.get_attribute("#lang-toggle", "lang") == "te" and page.inner_text("#lang-toggle") == "తెలుగు"
    assert page.get_attribute("#transcript", "lang") == "te", "the model's words stay Telugu"
    assert page.get_attribute("#start", "aria-label") is None
    assert page.get_attribute("#transcript", "aria-label") == "Agent's words"
    # No interface text is left in Telugu (the transcript, the model's words, and the toggle's offer aside).
    leftover = page.evaluate(
        """() => {
            const out = [];
            const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            for (let node = walker.nextNode(); node; node = walker.nextNode()) {
                if (!/[\\u0C00-\\u0C7F]/.test(node.data)) continue;
                if (node.parentElement.closest('[lang="te"]')) continue;
                out.push(node.data);
            }
            for (const el of document.querySelectorAll('[aria-label],[title]')) {
                if (el.closest('[lang="te"]')) continue;
                for (const a of ['aria-label', 'title']) {
                    const value = el.getAttribute(a) ?? '';
                    if (/[\\u0C00-\\u0C7F]/.test(value)) out.push(`${a}: ${value}`);
                }
            }
            return out;
        }"""
    )
    assert leftover == [], leftover
    assert rig.stats()["language"] == "en"

    # A later visit (same browser profile) opens in English, and switching back is remembered too.
    visit = page.context.new_page()
    try:
        visit.goto(rig.server.url + "/")
        visit.wait_for_function("() => document.documentElement.lang === 'en'")
        assert visit.inner_text("#start") == "Start"
        assert visit.evaluate("localStorage.getItem('voice-agent.lang')") == "en"
        visit.click("#lang-toggle")
        visit.wait_for_function("() => document.documentElement.lang === 'te'")
        visit.reload()
        visit.wait_for_function("() => window.voiceAgent && document.documentElement.lang === 'te'")
        assert visit.inner_text("#start") == "ప్రారంభించండి"
        assert visit.inner_text("#status") == "“ప్రారంభించండి” నొక్కి, మైక్రోఫోన్‌ను అనుమతించండి."
    finally:
        visit.close()

    page.click("#lang-toggle")  # back to Telugu for the rest (and the README's screenshot)
    page.wait_for_function("() => document.documentElement.lang === 'te'")
    assert page.inner_text("#start") == "ప్రారంభించండి"
    assert TELUGU.search(page.inner_text("#status"))
    assert not rig.page_errors


def test_server_counts_about_50_frames_per_second_from_the_page(rig: BrowserRig) -> None:
    rig.wait_frames_sent(rig.stats()["framesSent"] + 10)  # the socket is past its first burst

    def reading() -> tuple[int, float, float, int]:
        """The server's count, bracketed by the page's count just before and just after it: the two
        cannot be read at one instant, and the page sends a frame every 20 ms meanwhile."""
        before = rig.stats()["framesSent"]
        count, t = frames_in_total(rig.server), time.monotonic()
        return before, count, t, rig.stats()["framesSent"]

    before0, count0, t0, after0 = reading()
    rig.wait_frames_sent(after0 + RATE_WINDOW_FRAMES, timeout_s=RATE_WINDOW_FRAMES / FRAMES_PER_SECOND * 2)
    before1, count1, t1, after1 = reading()
    rate = (count1 - count0) / (t1 - t0)
    print(f"server counted {count1 - count0:.0f} frames in {t1 - t0:.2f} s = {rate:.1f}/s")
    # 50 a second; the bounds leave room for a loaded machine's scheduling between the two readings (the
    # next assertion is the exact one: everything the page sent arrived).
    assert 40 <= rate <= 60, f"{rate:.1f} frames/s"
    # Everything the page sent arrived: the server's count over the window lies between what the page had
    # surely sent and what it may have sent between the readings, give or take 3 frames on the wire.
    assert (before1 - after0) - 3 <= count1 - count0 <= (after1 - before0) + 3


def test_page_plays_frames_back_and_reports_underruns(rig: BrowserRig) -> None:
    before = rig.stats()
    assert isinstance(before["underruns"], int)
    rig.wait_for("n => window.voiceAgent.stats().framesPlayed >= n", before["framesPlayed"] + 50)
    after = rig.stats()
    assert isinstance(after["underruns"], int) and after["underruns"] >= before["underruns"]
    assert after["framesReceived"] > before["framesReceived"]
    # The panel shows the page's figures as of its last render: read both in the page at one moment, until
    # they agree (reading the stats here and the panel later raced an underrun in between: 14 against 13).
    rig.page.evaluate("async () => { window.testT = (await import('/i18n.js')).t; }")
    rig.wait_for("""() => {
        const shown = window.testT('latency.bufferDetail',
            {target: '', underruns: window.voiceAgent.stats().underruns, played: ''}).split(' · ')[1];
        return document.querySelector('#lat-buffer-detail').innerText.includes(shown);
    }""")
    print(f"played {after['framesPlayed']} frames; underruns {after['underruns']}")


def test_latency_monitor_shows_numbers(rig: BrowserRig) -> None:
    all_numeric = "(ids) => ids.every((c) => /\\d+(\\.\\d+)? ms/.test(document.querySelector(c).innerText))"
    rig.wait_for(all_numeric, list(MONITOR_VALUES))
    shown = {selector: rig.page.inner_text(selector) for selector in MONITOR_VALUES}
    print(shown)
    for selector, text in shown.items():
        assert NUMBER_MS.search(text), (selector, text)
    assert shown["#lat-total"].startswith("≈"), "every part of the mouth-to-ear estimate is known"
    stats = rig.stats()
    for key in ("rttMs", "serverMs", "bufferMs", "mouthToEarMs"):
        assert isinstance(stats[key], int | float) and stats[key] >= 0, (key, stats[key])
    # The estimate includes the model's 160 ms of algorithmic latency.
    assert stats["mouthToEarMs"] > 160


def test_speaking_indicator_follows_the_speech(rig: BrowserRig) -> None:
    # The looped conversation alternates 1-1.5 s silences with utterances, so both states come round.
    rig.page.wait_for_selector('#speaking[data-speaking="true"]', timeout=15_000)
    assert rig.page.inner_text("#speaking-label") == "మీరు: మాట్లాడుతున్నారు" == rig.t("speaking.yes")
    rig.page.wait_for_selector('#speaking[data-speaking="false"]', timeout=15_000)
    assert rig.page.inner_text("#speaking-label") == "మీరు: మౌనంగా ఉన్నారు" == rig.t("speaking.no")


def test_screenshots_mid_conversation(rig: BrowserRig) -> None:
    page = rig.page
    ARTIFACTS.mkdir(exist_ok=True)
    # Mid-conversation: the user is speaking and the agent has said something.
    rig.wait_for("() => window.voiceAgent.stats().transcript.length > 0")
    assert page.get_attribute("html", "lang") == "te", "the README's screenshot shows the Telugu page"
    rig.wait_for(QUALITY_SHOWN, list(QUALITY_VALUES.items()), timeout_s=30)
    page.wait_for_selector('#speaking[data-speaking="true"]', timeout=15_000)
    desktop = ARTIFACTS / "browser.png"
    page.screenshot(path=desktop, full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(desktop, DOCS_SCREENSHOT)

    page.set_viewport_size(PHONE)
    try:
        # Usable on a phone: nothing wider than the screen, both buttons fully on it and big enough to tap.
        layout = page.evaluate(
            """() => ({
                scrollWidth: document.documentElement.scrollWidth,
                buttons: ['start', 'stop'].map((id) => document.getElementById(id).getBoundingClientRect())
                    .map((r) => ({left: r.left, right: r.right, height: r.height})),
            })"""
        )
        assert layout["scrollWidth"] <= PHONE["width"], layout
        for button in layout["buttons"]:
            assert button["left"] >= 0 and button["right"] <= PHONE["width"], layout
            assert button["height"] >= 40, layout
        for selector in MONITOR_VALUES:
            box = page.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (selector, box)
        page.screenshot(path=ARTIFACTS / "browser-phone.png", full_page=True)
    finally:
        page.set_viewport_size(DESKTOP)
    assert not rig.page_errors


def test_page_reconnects_within_5_s_after_a_server_restart(rig: BrowserRig) -> None:
    first_session = rig.stats()["sessionId"]
    code, took = rig.stop_server()
    assert code == 0
    rig.wait_for("() => !window.voiceAgent.stats().connected")
    # From here the page sends nothing: frames are dropped, not queued, while it is disconnected.
    sent_while_down = rig.stats()["framesSent"]
    server = rig.start_server_on_the_same_port()
    ready_at = server.started + server.ready_s
    print(f"old server stopped in {took:.2f} s; new one ready {server.ready_s:.2f} s after its start")
    rig.wait_frames_sent(sent_while_down + 5, timeout_s=15)
    streaming_after_s = time.monotonic() - ready_at
    counted = frames_in_total(server)
    stats = rig.stats()
    print(f"page streaming {streaming_after_s:.2f} s after the new server's READY; {counted:.0f} frames in")
    assert streaming_after_s < RECONNECT_BUDGET_S
    assert counted > 0
    assert stats["state"] == "live" and stats["reconnects"] >= 1
    assert stats["sessionId"] and stats["sessionId"] != first_session
    assert not rig.page_errors
