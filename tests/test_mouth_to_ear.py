"""The mouth-to-ear probe in real Chromium (issue 12): one page with `?probe=1` against the loopback server,
Chrome's fake microphone playing marker bursts; the markers the capture worklet saw are found again, by
correlation, in what the playback worklet played. Behaviour only (a marker is matched, the latency is a
positive finite number); the figures themselves are bench/mouth_to_ear.py's, in bench/RESULTS.md.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.launcher import ServerProcess

SECONDS = 4.0  # about 7 markers after a 0.5 s warm-up


@pytest.fixture(scope="module")
def m2e() -> ModuleType:
    """The benchmark script, imported as the module of bench/ that it is."""
    return importlib.import_module("bench.mouth_to_ear")


def test_marker_wav_has_distinct_bursts(m2e: ModuleType, tmp_path: Path) -> None:
    wav = tmp_path / "markers.wav"
    starts = m2e.marker_wav(wav, seconds=5.0)
    assert len(starts) >= 5
    pcm, rate = m2e.np.frombuffer(wav.read_bytes()[44:], dtype="<i2").astype(float) / 32767, 16_000
    onsets = m2e.marker_onsets(pcm)
    # The detector finds each burst within a few ms of where it was written.
    assert len(onsets) == len(starts)
    for onset, start in zip(onsets, starts, strict=True):
        assert abs(onset / rate - start) < 0.005


def test_probe_times_a_marker_through_the_loopback_server(m2e: ModuleType, tmp_path: Path) -> None:
    wav = tmp_path / "markers.wav"
    m2e.marker_wav(wav, seconds=10.0)
    with ServerProcess("--engine", "loopback", "--max-sessions", "1") as server:
        (record,) = m2e.run_pages(server.url, 1, SECONDS, wav, poll_s=1.0)
    result = m2e.analyse(record, warmup_s=0.5)
    summary = result.summary()
    assert result.markers_seen >= 1, summary
    assert result.markers_matched >= 1, summary
    for latency in result.latency_ms:
        assert math.isfinite(latency) and latency > 0, summary
    assert min(result.scores) >= m2e.MIN_SCORE
    # The probe's parts are there too: the frame fill in the capture worklet and the jitter buffer's playout.
    assert result.frame_fill_ms is not None and result.frame_fill_ms > 0, summary
    assert result.playout_ms is not None and math.isfinite(result.playout_ms), summary
