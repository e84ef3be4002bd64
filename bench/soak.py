"""Soak: the demo checkpoint serving N sessions for minutes, one never reading and one reconnecting every
30 s; the RSS of every process, its open descriptors and the server's /dev/shm entries sampled throughout.

    python -m bench.soak --minutes 10 --sessions 8 --json soak.json

Bounded: loopback only, a fixed duration, then SIGTERM. "Flat at the end" is judged between the sample
taken after the first minute (warm-up, caches, first reconnect) and the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from procs.client import stream_client
from protocol import IN_FRAME_SAMPLES, encode_client_audio
from tests.support.launcher import SHM, ServerProcess, process_tree
from tests.support.speech import telugu_speech_16k

SAMPLE_EVERY_S = 10.0
WARM_UP_S = 60.0


@dataclass
class Sample:
    t_s: float
    rss_mb: dict[str, float]  # process name -> RSS
    fds: dict[str, int]
    shm_entries: int


@dataclass
class Soak:
    minutes: float
    sessions: int
    samples: list[Sample] = field(default_factory=list)
    frames_out: dict[str, int] = field(default_factory=dict)  # client -> frames received
    frames_sent: dict[str, int] = field(default_factory=dict)
    reconnects: int = 0
    exit_code: int | None = None


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

    clients = [normal(f"normal-{i}") for i in range(result.sessions - 2)]
    await asyncio.gather(sampler(), never_reading("never-reading"), reconnecting("reconnecting"), *clients)


def growth(first: Sample, last: Sample) -> dict[str, float]:
    return {name: round(last.rss_mb.get(name, 0) - mb, 1) for name, mb in first.rss_mb.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = Soak(args.minutes, args.sessions)
    with ServerProcess("--max-sessions", str(args.sessions), "--threads", "1") as server:
        asyncio.run(soak(server, result))
        result.samples.append(sample(server, result.minutes * 60))
        result.exit_code, _ = server.stop(signal.SIGTERM, timeout=60)
    leftover = list(SHM.glob(f"vring-{server.proc.pid}-*"))
    warm = next((s for s in result.samples if s.t_s >= WARM_UP_S), result.samples[0])
    last = result.samples[-1]
    print(f"\nsoak: {args.sessions} sessions, {args.minutes:g} min, exit {result.exit_code}, "
          f"{result.reconnects} reconnects, /dev/shm after exit: {len(leftover)}")
    print(f"RSS MB at {warm.t_s:.0f} s: {warm.rss_mb}")
    print(f"RSS MB at {last.t_s:.0f} s: {last.rss_mb}")
    print(f"RSS growth MB: {growth(warm, last)}")
    print(f"fds at {warm.t_s:.0f} s: {warm.fds}; at {last.t_s:.0f} s: {last.fds}")
    print(f"/dev/shm entries: {warm.shm_entries} -> {last.shm_entries}")
    for name in sorted(result.frames_out):
        print(f"  {name}: {result.frames_sent[name]} frames sent, {result.frames_out[name]} received")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    ok = result.exit_code == 0 and not leftover and np.isfinite(last.t_s)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
