"""Latency the running server adds, loopback engine (no model), over real WebSockets on 127.0.0.1.

One server (`supervisor.py --engine loopback --max-sessions 8`) serves every benchmark here.

test_server_latency[N] (N = 1, 4, 8): N clients stream SCENARIO_S of Telugu speech at real-time pace, each at
its own phase of the 20 ms clock, for pytest-benchmark rounds=1 (its time is the scenario's wall time; the
latencies are in extra_info). Per scenario:
  client   client sends the 4th frame of an 80 ms block -> client receives the block's first output frame
           (exact, every block after a 1 s warm-up, all clients pooled)
  server   last input frame of a block received by the network process -> first output frame sent, from
           the server itself: `voice_frame_latency_seconds` over the scenario (p99 interpolated within its
           buckets, which are coarse: 0.5, 1, 2, 5 ms; share <= 2 ms exact) and the sessions' per-second
           `latency` messages (median of their medians, largest p99 of any one second)
  CPU      % of one core used by the network, inference and VAD processes and the client (/proc/PID/stat),
           and by everything else on the machine
  The mean breakdown (queue, step, resample, transport) of the `latency` messages says where the time goes.
The table at the end gives p50/p99/max and the ratio to the 1-session run of the same pytest run; the goal
is a server p99 under 2 ms at 8 sessions on this 2-core machine.

test_frame_round_trip[1-session | 8-sessions]: the timed function is one frame round trip, client side:
send the 4th frame of a block, wait for that block's first output frame (the first three frames are sent at
real-time pace in the untimed setup). With 8-sessions, 7 other sessions stream real speech from a spawned
process meanwhile. Its median is what `pytest-benchmark compare` tracks. The timing includes one
asyncio `run_until_complete` (tens of µs).

test_capacity_demo_checkpoint (marked slow, ~40 s): the default server (demo checkpoint on the CPU) with 4
clients for 20 s, judged as bench/capacity_cpu.py judges it; the numbers go to extra_info.

    .venv/bin/pytest bench/test_bench_server.py -p no:cacheprovider   # ~100 s
    .venv/bin/pytest bench/test_bench_server.py -m "not slow"              # ~65 s, loopback only
    .venv/bin/pytest bench/test_bench_server.py --benchmark-autosave       # save a baseline
    .venv/bin/pytest bench/test_bench_server.py --benchmark-compare --benchmark-compare-fail=median:50%
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event as EventType
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.capacity_cpu import (
    CpuWindow,
    HistogramDelta,
    capacity_table,
    ensure_demo_checkpoint,
    run_capacity,
    scrape_metrics,
)
from procs.client import ClientRun, stream_client
from protocol import (
    BLOCK_MS,
    FRAMES_PER_BLOCK,
    IN_FRAME_SAMPLES,
    ClientSessionEnd,
    Latency,
    SessionEnd,
    encode_client_audio,
    encode_client_control,
)
from tests.support.helpers import FRAME_S
from tests.support.launcher import ServerProcess, role_pids
from tests.support.speech import conversation_16k, whole_blocks

SPAWN = multiprocessing.get_context("spawn")
SCENARIO_S = 12.0
WARMUP_S = 1.0  # blocks sent in each client's first second are left out of the statistics
SESSION_COUNTS = (1, 4, 8)
GOAL_P99_MS = 2.0
ROUND_TRIPS = 120  # 9.6 s of real-time pace
ROUND_TRIP_WARMUP = 10
PHASE_SEED = 20240


pytestmark = pytest.mark.loopback_server("--max-sessions", "8")


@pytest.fixture(scope="module")
def scenario_speech() -> np.ndarray:
    return whole_blocks(conversation_16k()[: int(SCENARIO_S * 16000)])


@dataclass
class Scenario:
    sessions: int
    client_ms: np.ndarray
    server_hist: HistogramDelta
    server_window_medians: list[float]
    server_window_p99s: list[float]
    breakdown_ms: dict[str, float]  # mean over the per-second `latency` messages of their mean breakdown
    cpu_percent: dict[str, float]

    def server_p50_ms(self) -> float:
        return float(np.median(self.server_window_medians))

    def row(self) -> dict[str, float]:
        c = self.client_ms
        return {
            "sessions": self.sessions,
            "blocks": len(c),
            "client_p50_ms": float(np.percentile(c, 50)),
            "client_p99_ms": float(np.percentile(c, 99)),
            "client_max_ms": float(c.max()),
            "server_p50_ms": self.server_p50_ms(),
            "server_p99_hist_ms": self.server_hist.quantile(0.99) * 1e3,
            "server_share_le_1ms": self.server_hist.fraction_le(0.001),
            "server_share_le_2ms": self.server_hist.fraction_le(0.002),
            "server_worst_second_p99_ms": max(self.server_window_p99s),
            **{f"server_{part}_ms": value for part, value in self.breakdown_ms.items()},
            "cpu_network_pct": self.cpu_percent.get("network", 0.0),
            "cpu_inference_pct": self.cpu_percent.get("inference", 0.0),
            "cpu_vad_pct": self.cpu_percent.get("vad", 0.0),
            "cpu_client_pct": self.cpu_percent.get("client", 0.0),
            "cpu_others_pct": self.cpu_percent.get("others", 0.0),
        }


async def stream_clients(url: str, pcm: np.ndarray, phases_s: list[float]) -> list[ClientRun]:
    """One client per phase; all start their block clocks from one moment, each offset by its phase, and
    each waits (up to 5 s) for every frame to come back before it ends its session."""
    start = asyncio.get_running_loop().time() + 0.2  # every session is open before the first frame
    n_frames = len(pcm) // IN_FRAME_SAMPLES
    return list(await asyncio.gather(*(
        stream_client(url, pcm, start_at=start + phase, tail_s=5.0, until_frames=n_frames)
        for phase in phases_s
    )))


def phases(n: int) -> list[float]:
    """Each client's offset in the 80 ms block clock: random but the same in every run (a fixed seed)."""
    rng = np.random.default_rng(PHASE_SEED + n)
    return sorted(float(p) for p in rng.uniform(0.0, BLOCK_MS / 1000, size=n))


def run_scenario(server: ServerProcess, pcm: np.ndarray, n: int) -> Scenario:
    before = scrape_metrics(server.url)
    cpu = CpuWindow({**role_pids(server.proc.pid), "supervisor": server.proc.pid, "client": os.getpid()})
    clients = asyncio.run(stream_clients(server.ws_url, pcm, phases(n)))
    cpu_percent = cpu.percent()
    after = scrape_metrics(server.url)
    n_frames = len(pcm) // IN_FRAME_SAMPLES
    names = ("voice_input_frames_dropped_total", "voice_output_frames_dropped_total")
    dropped = sum(after[name] - before.get(name, 0.0) for name in names)
    back = [len(c.frames) for c in clients]
    assert dropped == 0 and back == [n_frames] * n, f"frames back {back} of {n_frames}, {dropped:.0f} dropped"
    assert all(c.of_type(SessionEnd) for c in clients)
    # The first latency message covers the warm-up second.
    windows = [m for c in clients for m in c.of_type(Latency)[1:]]
    assert windows, "no latency messages"
    hist = HistogramDelta.between(before, after, "voice_frame_latency_seconds")
    assert hist.total == n * (n_frames // FRAMES_PER_BLOCK)  # one observation per block, all of them
    return Scenario(
        sessions=n,
        client_ms=np.array([ms for c in clients for ms in c.block_latencies_ms(WARMUP_S)]),
        server_hist=hist,
        server_window_medians=[m.ms for m in windows],
        server_window_p99s=[m.p99_ms for m in windows],
        breakdown_ms={part: float(np.mean([getattr(m.breakdown, f"{part}_ms") for m in windows]))
                      for part in ("queue", "step", "resample", "transport")},
        cpu_percent=cpu_percent,
    )


def print_past_capture(config: pytest.Config, text: str) -> None:
    """Printed past pytest's output capture, so the tables show without -s."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(text, flush=True)


@pytest.fixture(scope="module")
def scenarios(request: pytest.FixtureRequest):
    results: dict[int, Scenario] = {}
    yield results
    if results:
        print_past_capture(request.config, latency_table(results))


def latency_table(results: dict[int, Scenario]) -> str:
    base = results.get(1)
    lines = [
        "",
        f"Server-added latency, loopback engine, {SCENARIO_S:.0f} s of speech per session at real-time pace "
        f"(ms; blocks after the first {WARMUP_S:.0f} s)",
        f"{'N':>2} {'blocks':>6} | {'client p50':>10} {'p99':>6} {'max':>6} {'p99/1':>5} | "
        f"{'server p50':>10} {'p99~':>5} {'<=1ms':>6} {'<=2ms':>6} {'worst 1s p99':>12} {'p99~/1':>6} | "
        f"server mean: queue step resample transport | CPU %: net inf vad client others",
    ]
    for n, s in sorted(results.items()):
        r = s.row()
        client_ratio = r["client_p99_ms"] / base.row()["client_p99_ms"] if base else float("nan")
        server_ratio = r["server_p99_hist_ms"] / base.row()["server_p99_hist_ms"] if base else float("nan")
        lines.append(
            f"{n:>2} {r['blocks']:>6} | {r['client_p50_ms']:>10.2f} {r['client_p99_ms']:>6.2f} "
            f"{r['client_max_ms']:>6.2f} {client_ratio:>5.2f} | {r['server_p50_ms']:>10.2f} "
            f"{r['server_p99_hist_ms']:>5.2f} {r['server_share_le_1ms']:>6.1%} "
            f"{r['server_share_le_2ms']:>6.1%} "
            f"{r['server_worst_second_p99_ms']:>12.2f} {server_ratio:>6.2f} | "
            f"{r['server_queue_ms']:>17.2f} {r['server_step_ms']:>4.2f} {r['server_resample_ms']:>8.2f} "
            f"{r['server_transport_ms']:>9.2f} |        "
            f"{r['cpu_network_pct']:>3.0f} {r['cpu_inference_pct']:>3.0f} {r['cpu_vad_pct']:>3.0f} "
            f"{r['cpu_client_pct']:>6.0f} {r['cpu_others_pct']:>6.0f}"
        )
    if (top := results.get(max(results))) is not None:
        share = top.server_hist.fraction_le(0.002)
        lines.append(
            f"Goal, server p99 < {GOAL_P99_MS:.0f} ms at {top.sessions} sessions: "
            f"{'met' if share >= 0.99 else 'NOT met'} ({share:.2%} of blocks <= 2 ms, exact: a bucket bound)"
        )
    lines.append(
        "server p50: median of the per-second `latency.ms` medians; p99~: interpolated in the buckets "
        "(0.5/1/2/5 ms) of voice_frame_latency_seconds; worst 1s p99: largest per-second `latency.p99_ms`;"
        "\nCPU in % of one core (2 cores = 200 %); others: everything else on the machine (others' work)"
    )
    return "\n".join(lines)


@pytest.mark.parametrize("sessions", SESSION_COUNTS)
def test_server_latency(benchmark: Any, loopback_server: ServerProcess, scenario_speech: np.ndarray,
                        scenarios: dict[int, Scenario], sessions: int) -> None:
    result: list[Scenario] = []
    benchmark.pedantic(lambda: result.append(run_scenario(loopback_server, scenario_speech, sessions)),
                       rounds=1, iterations=1)
    scenario = result[0]
    scenarios[sessions] = scenario
    benchmark.extra_info.update(scenario.row())
    # Loose bounds that only a broken server misses on a busy 2-core machine; the goal is in the table.
    assert np.percentile(scenario.client_ms, 50) < 20.0
    assert scenario.server_hist.quantile(0.5) < 0.02


# ---------------------------------------------------------------------------------------------------------
# One frame round trip, for `pytest-benchmark compare`


def background_sessions(url: str, n: int, streaming: EventType, stop: EventType) -> None:
    """Spawned: n sessions stream real speech at real-time pace (looping it) until `stop` is set."""
    pcm = conversation_16k()

    async def main() -> None:
        done = asyncio.Event()
        audio = [asyncio.Event() for _ in range(n)]
        start = asyncio.get_running_loop().time() + 0.2
        tasks = [  # spread over the block clock
            asyncio.create_task(stream_client(url, pcm, first_audio=audio[i], repeat_until=done, tail_s=0,
                                              start_at=start + i * 0.0113))
            for i in range(n)
        ]
        await asyncio.gather(*(a.wait() for a in audio))
        streaming.set()
        await asyncio.to_thread(stop.wait)
        done.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())


class RoundTripClient:
    """One session driven block by block from synchronous code, for benchmark.pedantic."""

    def __init__(self, url: str, pcm: np.ndarray) -> None:
        self.loop = asyncio.new_event_loop()
        self.frames = [encode_client_audio(pcm[i : i + IN_FRAME_SAMPLES].tobytes())
                       for i in range(0, len(pcm) - IN_FRAME_SAMPLES + 1, IN_FRAME_SAMPLES)]
        self.ws: ClientConnection = self.loop.run_until_complete(connect(url, compression=None))
        self.sent = 0
        self.received = 0
        self.round_trips = 0
        self.next_due = 0.0

    async def _next_audio(self) -> None:
        while not isinstance(await self.ws.recv(), bytes):
            pass  # control messages (session_start, latency, vad) are not the answer
        self.received += 1

    async def _send(self) -> None:
        await self.ws.send(self.frames[self.sent % len(self.frames)])
        self.sent += 1

    async def _prepare(self) -> None:
        # The rest of the previous block's answer, then the block's first three frames at real-time pace.
        while self.received < self.sent:
            await self._next_audio()
        if not self.next_due:
            self.next_due = self.loop.time()
        for _ in range(FRAMES_PER_BLOCK):
            delay = self.next_due - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing, as a microphone delivers frames
            self.next_due += FRAME_S
            if self.sent % FRAMES_PER_BLOCK == FRAMES_PER_BLOCK - 1:
                return  # the block's last frame is sent by the timed function, on time
            await self._send()

    async def _round_trip(self) -> None:
        await self._send()
        await self._next_audio()
        self.round_trips += 1

    def prepare(self) -> None:
        self.loop.run_until_complete(self._prepare())

    def round_trip(self) -> None:
        self.loop.run_until_complete(self._round_trip())

    def close(self) -> None:
        async def end() -> None:
            await self.ws.send(encode_client_control(ClientSessionEnd()))
            with contextlib.suppress(ConnectionClosed):
                async for _ in self.ws:
                    pass

        self.loop.run_until_complete(asyncio.wait_for(end(), timeout=10))
        self.loop.close()


@pytest.mark.parametrize("others", [0, 7], ids=["1-session", "8-sessions"])
def test_frame_round_trip(benchmark: Any, loopback_server: ServerProcess, scenario_speech: np.ndarray,
                          others: int) -> None:
    streaming, stop = SPAWN.Event(), SPAWN.Event()
    load = SPAWN.Process(target=background_sessions, args=(loopback_server.ws_url, others, streaming, stop))
    if others:
        load.start()
        assert streaming.wait(timeout=30), "background sessions did not start"
    client = RoundTripClient(loopback_server.ws_url, scenario_speech)
    try:
        benchmark.pedantic(client.round_trip, setup=client.prepare, rounds=ROUND_TRIPS,
                           warmup_rounds=ROUND_TRIP_WARMUP, iterations=1)
    finally:
        client.close()
        stop.set()
        if others:
            load.join(timeout=20)
    # Every block answered in order; the last block's last three output frames are left unread.
    assert client.sent == FRAMES_PER_BLOCK * client.round_trips
    assert client.received == client.sent - (FRAMES_PER_BLOCK - 1)
    if others:
        assert load.exitcode == 0
    if benchmark.disabled:  # a smoke run (--benchmark-disable): one round trip ran, nothing was timed
        return
    assert client.round_trips == ROUND_TRIPS + ROUND_TRIP_WARMUP
    stats = benchmark.stats.stats
    benchmark.extra_info.update({
        "sessions": others + 1,
        "p99_ms": float(np.percentile(stats.data, 99)) * 1e3,
        "max_ms": stats.max * 1e3,
    })
    assert stats.median < 0.02


# ---------------------------------------------------------------------------------------------------------
# The demo checkpoint's CPU capacity, short (bench/capacity_cpu.py is the full measurement)

CAPACITY_SESSIONS = 4  # the goal
CAPACITY_S = 20.0


@pytest.mark.slow
def test_capacity_demo_checkpoint(benchmark: Any, request: pytest.FixtureRequest) -> None:
    """A fresh default server (demo checkpoint, CPU) with 4 clients streaming 20 s of speech: the verdict of
    bench/capacity_cpu.py (with 4 s warm-up and 6 s latency windows) and where the time went, in extra_info.
    Only the real-time share is asserted: drops and latency growth also come from other work on the
    machine, which the row's `cpu_percent["others"]` shows."""
    ensure_demo_checkpoint()
    rows = []
    benchmark.pedantic(lambda: rows.append(run_capacity(CAPACITY_SESSIONS, CAPACITY_S, 4.0, 6.0)),
                       rounds=1, iterations=1)
    row = rows[0]
    print_past_capture(request.config, "\n" + capacity_table([row], CAPACITY_S))
    benchmark.extra_info.update({k: v for k, v in asdict(row).items() if k != "cpu_percent"})
    benchmark.extra_info.update({f"cpu_{k}_pct": v for k, v in row.cpu_percent.items()})
    if not benchmark.disabled:  # the goal, when benchmarks run; the suite's one pass checks the body runs
        assert row.min_realtime_share >= 0.95, row
