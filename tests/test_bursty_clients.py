"""Clients that send in clumps, against the real server with the demo checkpoint on its step clock.

Wi-Fi and mobile links deliver frames in clumps, TCP coalesces, moshi's Python client sends one 80 ms Ogg
page at a time and its web UI one per 40 ms. With exact clocks, none of that is drift: nothing of the
caller's audio may be dropped or repeated (procs/inference/clock.py reads a session's clock from its
frames). The figures come from what the server reports: each session's `latency` messages on `/ws`, and
/metrics for moshi's wire, which has no such message.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.capacity_cpu import scrape_metrics
from bench.reference_client import ReferenceClient, StreamPlan, run_sessions
from procs.audio.resample import Resampler16to24
from procs.audio.speech import repeat_to, telugu_speech_16k
from procs.client import ClientRun, stream_client
from procs.launcher import ServerProcess
from protocol import Latency

SECONDS = 12.0
FRAMES = int(SECONDS * 50)
DROPPED = "voice_input_frames_dropped_total"
REALIGNED = "voice_input_frames_realigned_total"


@pytest.fixture(scope="module")
def demo_server(demo_checkpoint: str):
    with ServerProcess("--max-sessions", "4", "--step-clock", "on") as server:
        yield server


def speech16() -> np.ndarray:
    return repeat_to(telugu_speech_16k(), SECONDS)


def last_latency(run: ClientRun) -> Latency:
    reports = run.of_type(Latency)
    assert reports, "no latency message"
    return reports[-1]


def test_bursty_ws_clients_lose_and_repeat_nothing(demo_server: ServerProcess) -> None:
    # Clumps of 1, 2, 4 and 8 frames (20 to 160 ms), PCM and Opus, side by side at different phases.
    cases = [("pcm", 1), ("pcm", 4), ("opus", 2), ("pcm", 8)]
    pcm = speech16()

    async def scenario() -> list[ClientRun]:
        start = asyncio.get_running_loop().time() + 0.5
        return list(await asyncio.gather(*(
            stream_client(demo_server.ws_url, pcm, codec=codec, burst=burst, start_at=start + 0.013 * i,
                          until_frames=len(pcm) // 320 - 8, tail_s=10.0)
            for i, (codec, burst) in enumerate(cases))))

    runs = asyncio.run(scenario())
    for (codec, burst), run in zip(cases, runs, strict=True):
        report = last_latency(run)
        print(codec, burst, report.dropped_frames, report.realigned_frames, report.skipped_frames,
              f"queue {report.breakdown.queue_ms:.1f} ms", len(run.frames), run.sent)
        assert report.dropped_frames == 0 and report.realigned_frames <= 1, (codec, burst, report)
        assert 0 <= report.skipped_frames <= 3
        assert run.close_code == 1000 and not run.bad_frames
        # Every block was answered (the model's first block of delay aside), however the frames came.
        assert len(run.frames) >= run.sent - 8, (codec, burst, len(run.frames), run.sent)


@pytest.mark.parametrize("page_frames", [2, 3, 4])
def test_moshi_clients_sending_ogg_pages_lose_and_repeat_nothing(demo_server: ServerProcess,
                                                                 page_frames: int) -> None:
    # Two of moshi's clients (pages of 40, 60 or 80 ms: its web UI sends 40, its Python client 80).
    resampler = Resampler16to24()
    pcm24 = resampler.process(speech16()).astype(np.float32)
    before = scrape_metrics(demo_server.url)

    async def scenario() -> list[ReferenceClient]:
        loop = asyncio.get_running_loop()
        clients = [ReferenceClient(i, pcm24, page_frames=page_frames) for i in range(2)]
        plans = [StreamPlan(loop.time() + 0.5 + 0.029 * i, tail_s=2.0, patience_s=10.0) for i in range(2)]
        base = demo_server.url.replace("http://", "ws://")
        await run_sessions(clients, base, FRAMES, plans)  # type: ignore[arg-type]
        return clients

    clients = asyncio.run(scenario())
    after = scrape_metrics(demo_server.url)
    for client in clients:
        trace = client.trace
        assert trace.error is None and trace.t_handshake is not None, trace.error
        assert trace.audio_samples >= (FRAMES - 16) * 480, (trace.audio_samples, FRAMES)
    dropped, realigned = (after.get(k, 0.0) - before.get(k, 0.0) for k in (DROPPED, REALIGNED))
    print(f"pages of {20 * page_frames} ms: dropped {dropped:.0f}, realigned {realigned:.0f}")
    assert dropped == 0 and realigned <= len(clients)
