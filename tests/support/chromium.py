"""Headless Chromium as the tests and benchmarks drive the page: the fake microphone plays a WAV file, and
playback starts without a click (as it would after the user's click on Start).

    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=chromium_flags(wav))
"""

from __future__ import annotations

from pathlib import Path

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright drives it (no browser download)


def chromium_flags(microphone_wav: Path, *, many_pages: bool = False) -> list[str]:
    """`many_pages`: several pages at once, each a user's foreground page, so none is throttled as a
    background tab (the mouth-to-ear benchmark's N sessions in one browser)."""
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    if many_pages:
        flags += [
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
        ]
    return flags
