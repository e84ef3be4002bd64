"""Clients that send in clumps, against the real server on its step clock.

Wi-Fi and mobile links deliver frames in clumps, TCP coalesces, moshi's Python client sends one 80 ms Ogg
page at a time and its web UI one per 40 ms. With exact clocks, none of that is drift: nothing of the
caller's audio may be dropped or repeated (procs/inference/clock.py reads a session's clock from its
frames). The figures come from what the server reports: each session's `latency` messages on `/ws`, and
/metrics for moshi's wire, which has no such message.

Two servers, both with `--step-clock on`: the loopback engine, whose step costs nothing, so that any drop
is the clock's fault (none is allowed); and the demo checkpoint, where a drop can also mean that the CPU
cannot step the model in real time (this workplace's AMD EPYC, Zen 1, is at the edge of it at batch 2),
which the benchmarks measure: there every block must be answered or counted, and at most one frame
realigned per session.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.capacity_cpu import scrape_metrics
from bench.reference_client import ReferenceClient, StreamPlan, run_sessions
from procs.audio.resample import Resampler16to24
from procs.client import ClientRun, stream_client
from protocol import Latency
from tests.support.launcher import ServerProcess
from tests.support.speech import telugu_speech_for

SECONDS = 10.0
FRAMES = int(SECONDS * 50)
DROPPED = "voice_input_frames_dropped_total"
REALIGNED = "voice_input_frames_realigned_total"


@pytest.fixture(scope="module")
def clock_server():
    with ServerProcess("--engine", "loopback", "--max-sessions", "2", "--step-clock", "on") as server:
        yield server


@pytest.fixture(scope="module")
def immediate_server():
    """The loopback engine as it runs by default: no clock, each block stepped as soon as it is full."""
    with ServerProcess("--engine", "loopback", "--max-sessions", "2") as server:
        yield server


@pytest.fixture(scope="module")
def demo_server(demo_checkpoint: str):
    with ServerProcess("--max-sessions", "2", "--step-clock", "on") as server:
        yield server


def speech16() -> np.ndarray:
    return telugu_speech_for(SECONDS)


def last_latency(run: ClientRun) -> Latency:
    reports = run.of_type(Latency)
    assert reports, "no latency message"
    return reports[-1]


def stream_bursty(server: ServerProcess, cases: tuple[tuple[str, int], ...]) -> list[ClientRun]:
    pcm = speech16()

    async def scenario() -> list[ClientRun]:
        start = asyncio.get_running_loop().time() + 0.5
        return list(await asyncio.gather(*(
            stream_client(server.ws_url, pcm, codec=codec, burst=burst, start_at=start + 0.013 * i,
                          until_frames=len(pcm) // 320 - 8, tail_s=5.0)
            for i, (codec, burst) in enumerate(cases))))

    runs = asyncio.run(scenario())
    for (codec, burst), run in zip(cases, runs, strict=True):
        report = last_latency(run)
        print(codec, burst, f"dropped {report.dropped_frames} realigned {report.realigned_frames} skipped "
              f"{report.skipped_frames} queue {report.breakdown.queue_ms:.1f} ms step "
              f"{report.breakdown.step_ms:.1f} ms, {len(run.frames)} frames back of {run.sent}")
        assert report.realigned_frames <= 1 and 0 <= report.skipped_frames <= 3, (codec, burst, report)
        assert run.close_code == 1000 and not run.bad_frames
        # Every block answered or counted (the model's first block of delay aside).
        missing = run.sent - 8 - report.skipped_frames - report.dropped_frames
        assert len(run.frames) >= missing, (codec, burst, len(run.frames), run.sent)
    return runs


BURSTS = [(("pcm", 1), ("pcm", 4)), (("opus", 2), ("pcm", 8)), (("opus", 3), ("opus", 4))]


@pytest.mark.parametrize("cases", BURSTS, ids=["pcm 20+80 ms", "opus 40 + pcm 160 ms", "opus 60+80 ms"])
def test_bursty_ws_clients_lose_and_repeat_nothing(clock_server: ServerProcess,
                                                   cases: tuple[tuple[str, int], ...]) -> None:
    # Clumps of 1 to 8 frames (20 to 160 ms), PCM and Opus, side by side at different phases.
    for run in stream_bursty(clock_server, cases):
        assert last_latency(run).dropped_frames == 0


def test_without_the_clock_every_block_of_a_clump_is_stepped_at_once(immediate_server: ServerProcess) -> None:
    # Two blocks in one clump: the second is stepped right after the first, not when the next clump comes.
    for run in stream_bursty(immediate_server, (("pcm", 8), ("opus", 4))):
        report = last_latency(run)
        assert report.dropped_frames == report.realigned_frames == report.skipped_frames == 0
        assert report.breakdown.queue_ms < 40, report.breakdown


def test_bursty_ws_clients_of_the_demo_are_answered_and_not_realigned(demo_server: ServerProcess) -> None:
    stream_bursty(demo_server, (("pcm", 4), ("opus", 8)))


def stream_moshi_clients(server: ServerProcess, page_frames: int) -> tuple[float, float]:
    """Two of moshi's clients sending pages of `page_frames` x 20 ms; (dropped, realigned) from /metrics."""
    resampler = Resampler16to24()
    pcm24 = resampler.process(speech16()).astype(np.float32)
    before = scrape_metrics(server.url)

    async def scenario() -> list[ReferenceClient]:
        loop = asyncio.get_running_loop()
        clients = [ReferenceClient(i, pcm24, page_frames=page_frames) for i in range(2)]
        plans = [StreamPlan(loop.time() + 0.5 + 0.029 * i, tail_s=2.0, patience_s=10.0) for i in range(2)]
        await run_sessions(clients, server.url.replace("http://", "ws://"), FRAMES, plans)  # type: ignore[arg-type]
        return clients

    clients = asyncio.run(scenario())
    after = scrape_metrics(server.url)
    dropped, realigned = (after.get(k, 0.0) - before.get(k, 0.0) for k in (DROPPED, REALIGNED))
    print(f"pages of {20 * page_frames} ms: dropped {dropped:.0f}, realigned {realigned:.0f}")
    for client in clients:
        trace = client.trace
        assert trace.error is None and trace.t_handshake is not None, trace.error
        assert trace.audio_samples >= (FRAMES - 12 - dropped) * 480, (trace.audio_samples, FRAMES)
    assert realigned <= len(clients)
    return dropped, realigned


@pytest.mark.parametrize("page_frames", [2, 3, 4])
def test_moshi_clients_sending_ogg_pages_lose_and_repeat_nothing(clock_server: ServerProcess,
                                                                 page_frames: int) -> None:
    # moshi's clients on /api/chat: pages of 40, 60 or 80 ms (its web UI sends 40, its Python client 80;
    # sphn's writer, which both use, releases a page per 40 ms at the least, so 20 ms pages are /ws's case).
    dropped, _ = stream_moshi_clients(clock_server, page_frames)
    assert dropped == 0


def test_moshi_clients_of_the_demo_are_answered_and_not_realigned(demo_server: ServerProcess) -> None:
    stream_moshi_clients(demo_server, page_frames=4)
