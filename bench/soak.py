"""Soak: the demo checkpoint serving N sessions for minutes, one never reading, one reconnecting every
30 s (it ends its session and opens a new one) and one whose link drops every 30 s and resumes its session
(issue 19); the RSS of every process, its open descriptors and the server's /dev/shm entries sampled
throughout.

    python -m bench.soak --minutes 10 --sessions 8 --json soak.json

The resuming client streams through its own TcpProxy (tests/support/proxy.py) with `resume=True`: every
30 s the proxy resets its connection on both sides with no close frame, as a dying network does, and lets
connections through again after OUTAGE_S; each drop records whether the same session came back and how
long after the network did. The other N - 3 sessions stream speech for the whole run.

Bounded: loopback only, a fixed duration, then SIGTERM. "Flat at the end" is judged between the sample
taken after the first minute (warm-up, caches, first reconnect) and the last one, taken once every client
has gone; descriptors and segments also against a sample taken before the first client came. Before the
SIGTERM the server must hold no session (/health) and no detached one (/metrics), and have resumed exactly
the drops. Exit status 1 if any judgement fails (`verdict` in the JSON says which).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from procs.client import ClientRun, stream_client
from procs.network.resume import ResumeRefusal
from protocol import IN_FRAME_SAMPLES, Error, ErrorCode, encode_client_audio
from tests.support.launcher import SHM, ServerProcess, poll_until, process_tree
from tests.support.proxy import TcpProxy
from tests.support.speech import telugu_speech_16k

SAMPLE_EVERY_S = 10.0
WARM_UP_S = 60.0
DROP_EVERY_S = 30.0  # the scenario: the resuming client's link drops every 30 s (--drop-every)
OUTAGE_S = 0.5  # how long the network stays down each time: a Wi-Fi hand-over, a cell change (--outage)
# The last drop comes at least this long before the end (half the period in a shorter soak), so its resume
# is over before the clients stop.
LAST_DROP_BEFORE_END_S = 15.0
# How long a drop's resume is waited for: the server's default window (10 s), which is as long as the
# client tries, and slack for a loaded machine. Past it the drop counts as not resumed.
RESUME_WAIT_S = 15.0
SETTLE_S = 15.0  # after the clients: how long the server gets to release their slots (a close's goodbye)
# A tripwire, not a model of the allocator: the 2026-11-30 soak grew at most 1.1 MB in any process between
# the first minute and the end. The figures themselves are in the JSON.
RSS_SLACK_MB = 5.0


@dataclass
class Sample:
    t_s: float
    rss_mb: dict[str, float]  # process name -> RSS
    fds: dict[str, int]
    shm_entries: int


@dataclass
class Drop:
    """One cut of the resuming client's link, and what came back. Times are seconds of time.monotonic(),
    which is also the client's loop.time() (asyncio's default loop; `Soak.loop_minus_monotonic_s` checks)."""

    t_s: float  # the cut, since the soak began
    connections_cut: int  # what the proxy reset: 1 while the client is connected
    session_id: str | None  # of the session_start that followed (None: none came within RESUME_WAIT_S)
    resumed: bool  # that session_start said `resumed` and named the session the client had before
    after_restore_s: float | None  # the network back (the proxy's restore) -> that session_start received
    server_gap_s: float | None  # its `resume_gap_s`: the server noticing the drop -> the re-attach


@dataclass
class EndState:
    """The server once every client has gone, before the SIGTERM: what /health and /metrics say."""

    settled_after_s: float | None  # until /health said 0 sessions (None: not within SETTLE_S)
    sessions_active: int | None
    sessions_detached: float | None
    sessions_resumed_total: float | None
    resume_failures: dict[str, float | None] = field(default_factory=dict)  # by reason
    sessions_total: float | None = None
    # Whether the model kept up: frames in, frames out and input frames the inference dropped (it fell
    # behind), all sessions together. A server that does not keep up is soaked less than it seems.
    frames: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Soak:
    minutes: float
    sessions: int
    drop_every_s: float = DROP_EVERY_S
    outage_s: float = OUTAGE_S
    samples: list[Sample] = field(default_factory=list)
    frames_out: dict[str, int] = field(default_factory=dict)  # client -> frames received
    frames_sent: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    exit_code: int | None = None
    idle_before: Sample | None = None  # before the first client connected
    loop_minus_monotonic_s: float | None = None  # the client's loop.time() against time.monotonic()
    drops: list[Drop] = field(default_factory=list)
    resume_frames_skipped: int = 0  # the resuming client's frames due while its link was down
    resume_failed_errors: int = 0  # `error` resume_failed the resuming client received
    resuming_close_code: int | None = None
    end: EndState | None = None
    verdict: dict[str, bool] = field(default_factory=dict)  # each judgement; all must hold
    # os.getloadavg() as the soak began and ended: a busy machine slows the model, not the bookkeeping
    load_average: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def process_name(server: ServerProcess, pid: int) -> str:
    if pid == server.proc.pid:
        return "supervisor"
    for role in ("network", "vad", "inference"):
        if pid == server.child_pid(role):
            return role
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = " ".join(part.decode(errors="replace") for part in cmdline)
    if "resource_tracker" in text:
        return "resource_tracker"
    return Path(f"/proc/{pid}/comm").read_text().strip()


def sample(server: ServerProcess, t_s: float) -> Sample:
    rss, fds = {}, {}
    for pid in process_tree(server.proc.pid):
        with contextlib.suppress(OSError):
            name = process_name(server, pid)
            status = Path(f"/proc/{pid}/status").read_text()
            kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            rss[name] = round(kb / 1024, 1)
            fds[name] = len(os.listdir(f"/proc/{pid}/fd"))
    shm = len(list(SHM.glob(f"vring-{server.proc.pid}-*")))
    return Sample(round(t_s, 1), rss, fds, shm)


async def soak(server: ServerProcess, result: Soak) -> None:
    pcm = telugu_speech_16k()
    loop = asyncio.get_running_loop()
    result.loop_minus_monotonic_s = loop.time() - time.monotonic()
    result.idle_before = sample(server, 0.0)
    t0 = loop.time()
    end = t0 + result.minutes * 60
    stop = asyncio.Event()

    async def normal(name: str) -> None:
        run = await stream_client(server.ws_url, pcm, repeat_until=stop, tail_s=0.5)
        result.frames_out[name], result.frames_sent[name] = len(run.frames), run.sent

    async def reconnecting(name: str) -> None:
        out = sent = 0
        while loop.time() < end - 1:
            leg = asyncio.Event()
            loop.call_at(min(loop.time() + 30, end), leg.set)
            run = await stream_client(server.ws_url, pcm, repeat_until=leg, tail_s=0.5)
            out, sent = out + len(run.frames), sent + run.sent
            result.reconnects += 1
        result.frames_out[name], result.frames_sent[name] = out, sent

    async def resuming(name: str) -> None:
        """Streams through its own proxy, whose link is cut every `drop_every_s` and restored `outage_s`
        later; the client resumes its session as the page does."""
        run = ClientRun()
        host, port = server.url.rsplit("//", 1)[1].rsplit(":", 1)
        with TcpProxy(host, int(port)) as proxy:
            client = asyncio.create_task(stream_client(proxy.url(), pcm, repeat_until=stop, tail_s=0.5,
                                                       resume=True, run=run))
            margin = min(LAST_DROP_BEFORE_END_S, result.drop_every_s / 2)
            k = 1
            while (due := t0 + k * result.drop_every_s) < end - margin and not client.done():
                k += 1
                await asyncio.sleep(max(0.0, due - loop.time()))  # the scenario's schedule
                before = run.session_starts[-1] if run.session_starts else None
                n = len(run.session_starts)
                cut = await asyncio.to_thread(proxy.cut)
                cut_at = loop.time()
                await asyncio.sleep(result.outage_s)  # the outage: a scenario parameter
                await asyncio.to_thread(proxy.restore)
                restored_at = proxy.restored_at
                assert restored_at is not None
                deadline = loop.time() + RESUME_WAIT_S
                while len(run.session_starts) <= n and loop.time() < deadline and not client.done():
                    await asyncio.sleep(0.01)  # polls the client's record; the deadline bounds it
                if len(run.session_starts) > n:
                    start = run.session_starts[n]
                    same = before is not None and start.session_id == before.session_id
                    gap = start.resume_gap_s
                    result.drops.append(Drop(round(cut_at - t0, 3), cut, start.session_id,
                                             start.resumed and same,
                                             round(run.reconnected[n - 1] - restored_at, 4),
                                             None if gap is None else round(gap, 4)))
                else:
                    result.drops.append(Drop(round(cut_at - t0, 3), cut, None, False, None, None))
            await client
        result.frames_out[name], result.frames_sent[name] = len(run.frames), run.sent
        result.resume_frames_skipped = run.frames_skipped
        result.resume_failed_errors = sum(e.code is ErrorCode.RESUME_FAILED for e in run.of_type(Error))
        result.resuming_close_code = run.close_code

    async def never_reading(name: str) -> None:
        sent = 0
        frame = encode_client_audio(pcm[:IN_FRAME_SAMPLES].tobytes())
        with contextlib.suppress(ConnectionClosed, OSError):
            async with connect(server.ws_url) as ws:
                ws.transport.pause_reading()
                while not stop.is_set():
                    await ws.send(frame)
                    sent += 1
                    await asyncio.sleep(0.02)  # pacing, as a microphone
        result.frames_out[name], result.frames_sent[name] = 0, sent

    async def sampler() -> None:
        while loop.time() < end:
            result.samples.append(sample(server, loop.time() - t0))
            print(json.dumps(asdict(result.samples[-1])), flush=True)
            await asyncio.sleep(min(SAMPLE_EVERY_S, max(0.0, end - loop.time())))
        stop.set()

    clients = [normal(f"normal-{i}") for i in range(result.sessions - 3)]
    await asyncio.gather(sampler(), never_reading("never-reading"), reconnecting("reconnecting"),
                         resuming("resuming"), *clients)


def end_state(server: ServerProcess) -> EndState:
    """Slots and detached sessions once the clients have gone (the server gets SETTLE_S to release them)."""
    settled = poll_until(lambda: server.health()[1].get("sessions_active") == 0, SETTLE_S)
    return EndState(
        settled_after_s=settled,
        sessions_active=server.health()[1].get("sessions_active"),
        sessions_detached=server.metric("voice_sessions_detached"),
        sessions_resumed_total=server.metric("voice_sessions_resumed_total"),
        resume_failures={r.value: server.metric(f'voice_resume_failures_total{{reason="{r.value}"}}')
                         for r in ResumeRefusal},
        sessions_total=server.metric("voice_sessions_total"),
        frames={name: server.metric(name) for name in ("voice_frames_in_total", "voice_frames_out_total",
                                                       "voice_input_frames_dropped_total")},
    )


def judge(result: Soak, warm: Sample, leftover: int) -> dict[str, bool]:
    """Each of the soak's judgements (JSON and metrics only, never the log's wording). RSS is judged only
    after a warm-up: before it, growth is the sessions' start."""
    last, before, end = result.samples[-1], result.idle_before, result.end
    assert before is not None and end is not None
    resumed = [d for d in result.drops if d.resumed]
    rss: dict[str, bool] = {}
    if warm.t_s >= WARM_UP_S and warm is not last:
        rss = {f"RSS grew < {RSS_SLACK_MB:g} MB in every process after warm-up":
               all(g < RSS_SLACK_MB for g in growth(warm, last).values())}
    return {
        "exit 0 on SIGTERM": result.exit_code == 0,
        "no /dev/shm segment after the exit": leftover == 0,
        **rss,
        "descriptors at the end <= before the first client, every process":
            all(last.fds.get(name, 0) <= n for name, n in before.fds.items()),
        "/dev/shm entries at the end == before the first client": last.shm_entries == before.shm_entries,
        "no session held at the end (/health)": end.sessions_active == 0,
        "no session detached at the end": end.sessions_detached == 0,
        "the link dropped at least once": bool(result.drops),
        "every drop resumed the same session": len(resumed) == len(result.drops),
        "resumed_total == drops": end.sessions_resumed_total == len(result.drops),
        "no resume failed": result.resume_failed_errors == 0
                            and not any(end.resume_failures.values()),
    }


def after_restore_ms(drops: list[Drop]) -> dict[str, float | None]:
    waits = [d.after_restore_s * 1e3 for d in drops if d.after_restore_s is not None]
    return {"median": round(statistics.median(waits), 1) if waits else None,
            "max": round(max(waits), 1) if waits else None}


def growth(first: Sample, last: Sample) -> dict[str, float]:
    return {name: round(last.rss_mb.get(name, 0) - mb, 1) for name, mb in first.rss_mb.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--drop-every", type=float, default=DROP_EVERY_S,
                        help="seconds between the resuming client's link drops (default %(default)g)")
    parser.add_argument("--outage", type=float, default=OUTAGE_S,
                        help="seconds the network stays down each time (default %(default)g)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.sessions < 3:
        parser.error("--sessions: at least 3 (never reading, reconnecting, resuming)")
    result = Soak(args.minutes, args.sessions, args.drop_every, args.outage)
    result.load_average["start"] = os.getloadavg()
    with ServerProcess("--max-sessions", str(args.sessions), "--threads", "1") as server:
        asyncio.run(soak(server, result))
        result.end = end_state(server)
        result.samples.append(sample(server, result.minutes * 60))
        result.exit_code, _ = server.stop(signal.SIGTERM, timeout=60)
    result.load_average["end"] = os.getloadavg()
    leftover = list(SHM.glob(f"vring-{server.proc.pid}-*"))
    warm = next((s for s in result.samples if s.t_s >= WARM_UP_S), result.samples[0])
    last = result.samples[-1]
    result.verdict = judge(result, warm, len(leftover))
    print(f"\nsoak: {args.sessions} sessions, {args.minutes:g} min, exit {result.exit_code}, "
          f"{result.reconnects} reconnects, /dev/shm after exit: {len(leftover)}")
    resumed = sum(d.resumed for d in result.drops)
    print(f"drops: {len(result.drops)}, the same session resumed after {resumed}; "
          f"resume after the network came back (ms): {after_restore_ms(result.drops)}; "
          f"resume_failed errors: {result.resume_failed_errors}")
    print(f"at the end: {result.end}")
    print(f"RSS MB at {warm.t_s:.0f} s: {warm.rss_mb}")
    print(f"RSS MB at {last.t_s:.0f} s: {last.rss_mb}")
    print(f"RSS growth MB: {growth(warm, last)}")
    print(f"fds at {warm.t_s:.0f} s: {warm.fds}; at {last.t_s:.0f} s: {last.fds}")
    print(f"/dev/shm entries: {warm.shm_entries} -> {last.shm_entries}")
    for name in sorted(result.frames_out):
        print(f"  {name}: {result.frames_sent[name]} frames sent, {result.frames_out[name]} received")
    assert result.idle_before is not None
    print(f"fds before the first client: {result.idle_before.fds}; "
          f"/dev/shm entries: {result.idle_before.shm_entries}")
    for check, held in result.verdict.items():
        print(f"  {'ok  ' if held else 'FAIL'} {check}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0 if all(result.verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
