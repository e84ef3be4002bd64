"""Audio-quality monitoring end to end: the real server (loopback engine, real Silero in its VAD process),
real WebSockets, Telugu speech from espeak-ng streamed at real-time pace; the figures are read from the
`latency` messages' `quality` and from /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from procs.audio.silero import offline_speech_segments
from procs.client import stream_client
from protocol import (
    IN_FRAME_SAMPLES,
    ClientSessionEnd,
    ClientStats,
    Error,
    ErrorCode,
    Latency,
    SessionQuality,
    decode_server,
    encode_client_audio,
    encode_client_control,
)
from tests.support.helpers import FRAME_S
from tests.support.launcher import ServerProcess
from tests.support.speech import conversation_16k

pytestmark = pytest.mark.loopback_server("--max-sessions", "4")


@pytest.fixture(scope="module")
def loud_conversation() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Telugu conversation at a level that leaves headroom for the noise, and Silero's own segments."""
    pcm = conversation_16k().astype(np.float64)
    pcm *= 0.5 * 32767 / np.max(np.abs(pcm))
    clean = np.round(pcm).astype(np.int16)
    return clean, offline_speech_segments(clean)


def qualities(controls: list[object]) -> list[SessionQuality]:
    return [m.quality for m in controls if isinstance(m, Latency) and m.quality is not None]


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
            if ln and not ln.startswith("#")}


# ---- SNR -------------------------------------------------------------------------------------------------


def mix_at(clean: np.ndarray, segments: list[tuple[float, float]], snr_db: float, seed: int
           ) -> tuple[np.ndarray, float]:
    """Clean speech plus white noise scaled so that speech power over noise power, both over the speech
    segments, is `snr_db`; returns the mix and its true SNR (after rounding and clipping to int16)."""
    speech = clean.astype(np.float64)
    inside = np.zeros(len(speech), dtype=bool)
    for start_ms, end_ms in segments:
        inside[int(start_ms * 16): int(end_ms * 16)] = True
    noise = np.random.default_rng(seed).standard_normal(len(speech))
    noise *= math.sqrt(np.mean(speech[inside] ** 2) / 10 ** (snr_db / 10) / np.mean(noise[inside] ** 2))
    mix = np.clip(np.round(speech + noise), -32768, 32767).astype(np.int16)
    actual_noise = mix.astype(np.float64) - speech
    true = 10 * math.log10(np.sum(speech[inside] ** 2) / np.sum(actual_noise[inside] ** 2))
    return mix, true


def test_snr_estimates_of_speech_in_white_noise_are_within_3_db(loopback_server: ServerProcess,
                                                                loud_conversation) -> None:
    clean, segments = loud_conversation
    mixes = [mix_at(clean, segments, target, seed) for target, seed in ((10.0, 1), (30.0, 2))]

    async def both() -> list:
        return await asyncio.gather(*(stream_client(loopback_server.ws_url, pcm, tail_s=1.5)
                                      for pcm, _ in mixes))

    runs = asyncio.run(both())
    for (_, true), run in zip(mixes, runs, strict=True):
        reports = qualities([m for _, m in run.controls])
        assert reports, "no latency message carried a quality report"
        estimate = reports[-1].snr_db
        print(f"true SNR {true:.1f} dB -> estimated {estimate} dB")
        assert estimate is not None and abs(estimate - true) <= 3.0, (true, estimate)
        noisy = "noisy" in reports[-1].warnings
        assert noisy == (estimate < 10.0)
    assert "noisy" not in qualities([m for _, m in runs[1].controls])[-1].warnings  # 30 dB


# ---- loss and spikes: clients of our own pace ------------------------------------------------------------


@dataclass
class PacedRun:
    controls: list[object] = field(default_factory=list)
    frames_back: int = 0
    sent: int = 0


async def paced_client(url: str, pcm: np.ndarray, *, skip: Callable[[int], bool] = lambda i: False,
                       stall_at: int | None = None, stall_s: float = 0.0,
                       inject: dict[int, list[str]] | None = None) -> PacedRun:
    """Frame i is due at start + i x 20 ms (real-time pace, as a microphone). `skip(i)`: frame i is never
    sent (its time passes all the same). At frame `stall_at` the client stalls `stall_s`, then sends what it
    held back at once and goes on at the pace (a network or tab that stalls, then catches up)."""
    run = PacedRun()
    frames = [encode_client_audio(pcm[i * IN_FRAME_SAMPLES:(i + 1) * IN_FRAME_SAMPLES].tobytes())
              for i in range(len(pcm) // IN_FRAME_SAMPLES)]
    loop = asyncio.get_running_loop()
    reported = asyncio.Condition()
    async with connect(url, compression=None) as ws:

        async def receive() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    decoded = decode_server(message)
                    if isinstance(decoded, memoryview):
                        run.frames_back += 1
                    else:
                        run.controls.append(decoded)
                        if isinstance(decoded, Latency):
                            async with reported:
                                reported.notify_all()

        receiver = asyncio.create_task(receive())
        t0 = loop.time()
        for i, frame in enumerate(frames):
            if i == stall_at:
                await asyncio.sleep(stall_s)  # the stall; the frames held back then go at once
            delay = t0 + i * FRAME_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # real-time pace
            for raw in (inject or {}).get(i, []):
                await ws.send(raw)
            if not skip(i):
                await ws.send(frame)
                run.sent += 1
        # The last second's loss is known a second on: wait for two more reports (bounded).
        seen = sum(isinstance(m, Latency) for m in run.controls)
        async with reported:
            await asyncio.wait_for(
                reported.wait_for(lambda: sum(isinstance(m, Latency) for m in run.controls) >= seen + 2),
                timeout=5)
        await ws.send(encode_client_control(ClientSessionEnd()))
        await asyncio.wait_for(receiver, timeout=10)
    return run


def test_a_client_that_drops_5_percent_is_reported_at_5_percent_loss_and_a_stall_as_a_spike(
        loopback_server: ServerProcess, loud_conversation) -> None:
    clean, _ = loud_conversation
    pcm = clean[: 20 * 16000]

    async def both() -> tuple[PacedRun, PacedRun]:
        lossy = paced_client(loopback_server.ws_url, pcm, skip=lambda i: i % 20 == 19)
        # 8 s in: 0.5 s, then all
        stalled = paced_client(loopback_server.ws_url, pcm, stall_at=400, stall_s=0.5)
        return await asyncio.gather(lossy, stalled)

    lossy, stalled = asyncio.run(both())
    last = [m for m in lossy.controls if isinstance(m, Latency)][-1]
    assert last.quality is not None
    due = len(pcm) // IN_FRAME_SAMPLES
    # The loss has two parts: frames that never came (the client's 5 %), and frames the inference process
    # dropped because it fell behind (on a loaded machine); the latter are in `dropped_frames` too.
    never_came = last.quality.input_loss_pct - 100 * last.dropped_frames / due
    print(f"dropping every 20th frame: {last.quality.input_loss_pct:.2f} % loss reported, "
          f"{last.dropped_frames} frames of it dropped by inference: {never_came:.2f} % never came; "
          f"stalled 0.5 s: {qualities(stalled.controls)[-1]}")
    assert 4.0 <= never_came <= 6.0
    assert any("input_loss" in q.warnings for q in qualities(lossy.controls))
    stalled_reports = qualities(stalled.controls)
    assert stalled_reports[-1].spikes >= 1
    assert any("latency_spikes" in q.warnings for q in stalled_reports)
    # Every frame came (late), so none counts as never come. The inference process queues the burst and
    # works it off with catch-up steps; whatever it drops (a queue beyond 640 ms) is loss of the second
    # kind, in `dropped_frames`, and nothing else is.
    last = [m for m in stalled.controls if isinstance(m, Latency)][-1]
    assert last.quality is not None
    assert last.quality.input_loss_pct - 100 * last.dropped_frames / due <= 0.5


# ---- level warnings ----------------------------------------------------------------------------------------


def test_clipping_and_quiet_microphones_are_warned_about(loopback_server: ServerProcess,
                                                         loud_conversation) -> None:
    clean, _ = loud_conversation
    pcm = clean[: 12 * 16000].astype(np.float64)
    clipped = np.clip(pcm * 6, -32768, 32767).astype(np.int16)
    quiet = np.round(pcm * 10 ** (-42 / 20)).astype(np.int16)  # about -60 dBFS while speaking

    async def both() -> list:
        return await asyncio.gather(stream_client(loopback_server.ws_url, clipped, tail_s=1.5),
                                    stream_client(loopback_server.ws_url, quiet, tail_s=1.5))

    loud_run, quiet_run = asyncio.run(both())
    loud = qualities([m for _, m in loud_run.controls])
    soft = qualities([m for _, m in quiet_run.controls])
    print("clipped:", max(q.clipped_pct for q in loud), "% at most; quiet:", [q.warnings for q in soft][-3:])
    assert any("clipping" in q.warnings for q in loud)
    assert max(q.peak_dbfs for q in loud) == pytest.approx(0.0, abs=0.01)
    assert any("quiet" in q.warnings for q in soft)
    assert not any("clipping" in q.warnings for q in soft)


# ---- client_stats ----------------------------------------------------------------------------------------


def test_client_stats_are_validated_and_reach_metrics(loopback_server: ServerProcess,
                                                       loud_conversation) -> None:
    clean, _ = loud_conversation
    pcm = clean[: 5 * 16000]
    before = metrics(loopback_server.url)
    bad = json.dumps({"type": "client_stats", "underruns": 1, "concealed_ms": 20.0, "late_frames": -3,
                      "playout_delay_ms": 40.0})
    good = [encode_client_control(ClientStats(underruns=2 * k, concealed_ms=40.0 * k, late_frames=k,
                                              playout_delay_ms=35.0, rtt_ms=4.0)) for k in range(1, 5)]
    inject = {50: [bad], 100: [good[0]], 150: [good[1]], 175: [good[2]], 200: [good[3]]}
    run = asyncio.run(paced_client(loopback_server.ws_url, pcm, inject=inject))
    errors = [m for m in run.controls if isinstance(m, Error)]
    assert [(e.code, e.fatal) for e in errors] == [(ErrorCode.BAD_FIELD, False)]
    assert run.frames_back >= 0.9 * run.sent  # the session went on
    assert any("playback_gaps" in q.warnings for q in qualities(run.controls))
    after = metrics(loopback_server.url)
    assert after["voice_client_underruns_total"] - before["voice_client_underruns_total"] == 8
    assert after["voice_client_late_frames_total"] - before["voice_client_late_frames_total"] == 4
    assert after["voice_client_concealed_seconds_total"] - before[
        "voice_client_concealed_seconds_total"] == pytest.approx(0.16)
    # The page's figures enter the histograms once a report period (its latest), however often it sends:
    # four messages over 2 s are one to four observations, each of 35 ms playout delay and 4 ms RTT.
    observed = after["voice_client_playout_delay_seconds_count"] - before[
        "voice_client_playout_delay_seconds_count"]
    assert 1 <= observed <= 4
    assert after["voice_client_playout_delay_seconds_sum"] - before[
        "voice_client_playout_delay_seconds_sum"] == pytest.approx(0.035 * observed)
    assert after['voice_client_rtt_seconds_bucket{le="0.005"}'] - before[
        'voice_client_rtt_seconds_bucket{le="0.005"}'] == observed
    for name in ("voice_input_level_dbfs_count", "voice_snr_db_count", "voice_input_frames_lost_total",
                 "voice_latency_spikes_total", 'voice_sessions_quality_warning{warning="clipping"}'):
        assert name in after
    assert after["voice_input_level_dbfs_count"] > before["voice_input_level_dbfs_count"]
