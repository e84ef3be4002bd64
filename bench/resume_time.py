"""Resume time: how soon after the network comes back a dropped conversation goes on.

The Python client (procs/client.py, `resume=True`, which reconnects as the page does) streams Telugu speech
at real-time pace through a TCP proxy (tests/support/proxy.py) to a real server. `--cuts` times, once audio
flows, the proxy cuts the link (an RST both ways, never a WebSocket close), keeps the network down for
`--outage` seconds (new connections are reset), and brings it back. Per cut:

  after restore   the network coming back -> the resumed `session_start` at the client: what a person waits
                  for once their network is back (the client retries every 100 ms while it is down)
  server gap      the server noticing the drop -> the re-attach (`session_start.resume_gap_s`)
  first audio     the network coming back -> the first model frame after the resume

It checks what must hold whatever the speed: every resume took up the same session, and at the end no slot
is held (`/health` sessions_active 0, `voice_sessions_detached` 0).

    .venv/bin/python -m bench.resume_time --cuts 100 --json resume.json
    .venv/bin/python -m bench.resume_time --engine demo --cuts 20 --outage 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from procs.client import ClientRun, stream_client
from tests.support.launcher import ServerProcess, poll_until
from tests.support.proxy import TcpProxy
from tests.support.speech import telugu_speech_16k


@dataclass
class ResumeFigures:
    engine: str
    cuts: int
    outage_s: float
    after_restore_ms: list[float] = field(default_factory=list)
    server_gap_ms: list[float] = field(default_factory=list)
    first_audio_ms: list[float] = field(default_factory=list)
    same_session: bool = False
    resumed_total: float = 0.0  # the server's voice_sessions_resumed_total
    resume_failures: float = 0.0
    sessions_active_after: int = -1
    detached_after: float = -1.0

    def summary(self) -> dict[str, dict[str, float]]:
        def stats(values: list[float]) -> dict[str, float]:
            if not values:
                return {}
            p50, p99 = np.percentile(values, [50, 99])
            return {"p50": round(float(p50), 1), "p99": round(float(p99), 1), "max": round(max(values), 1)}

        return {"after_restore_ms": stats(self.after_restore_ms), "server_gap_ms": stats(self.server_gap_ms),
                "first_audio_ms": stats(self.first_audio_ms)}


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        return r.read().decode()


def metric_sum(text: str, name: str) -> float:
    """The sum of every series of `name` (one, or one per label value)."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


async def cut_and_resume(proxy: TcpProxy, figures: ResumeFigures) -> ClientRun:
    done = asyncio.Event()
    run = ClientRun()
    client = asyncio.create_task(stream_client(proxy.url(), telugu_speech_16k(), repeat_until=done,
                                               resume=True, run=run, tail_s=1.0))
    restored: list[float] = []
    for k in range(figures.cuts):
        frames_before = len(run.frames)
        while len(run.frames) < frames_before + 10:  # mid-sentence: audio flows on this link
            await asyncio.sleep(0.01)  # polls the client's record
        await asyncio.to_thread(proxy.cut)
        await asyncio.sleep(figures.outage_s)  # the outage itself
        await asyncio.to_thread(proxy.restore)
        restored.append(time.monotonic())
        while len(run.reconnected) < k + 1 or run.frames[-1][0] < run.reconnected[k]:
            if client.done():
                raise RuntimeError(f"the client stopped at cut {k}: {client.exception()!r}")
            await asyncio.sleep(0.01)  # polls the client's record
        first_after = next(t for t, _ in run.frames if t >= run.reconnected[k])
        figures.after_restore_ms.append((run.reconnected[k] - restored[k]) * 1e3)
        figures.first_audio_ms.append((first_after - restored[k]) * 1e3)
    done.set()
    await client
    figures.server_gap_ms = [start.resume_gap_s * 1e3 for start in run.session_starts[1:]
                             if start.resume_gap_s is not None]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["loopback", "demo"], default="loopback")
    parser.add_argument("--cuts", type=int, default=100)
    parser.add_argument("--outage", type=float, default=0.5, metavar="S", help="how long the network is down")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    figures = ResumeFigures(args.engine, args.cuts, args.outage)
    engine = ("--engine", "loopback") if args.engine == "loopback" else ()
    with ServerProcess(*engine, "--max-sessions", "2") as server:
        with TcpProxy("127.0.0.1", int(server.url.rsplit(":", 1)[1])) as proxy:
            run = asyncio.run(cut_and_resume(proxy, figures))
        poll_until(lambda: server.health()[1].get("sessions_active") == 0, 10.0)
        text = scrape(server)
        figures.same_session = len({s.session_id for s in run.session_starts}) == 1
        figures.resumed_total = metric_sum(text, "voice_sessions_resumed_total")
        figures.resume_failures = metric_sum(text, "voice_resume_failures_total")
        figures.detached_after = metric_sum(text, "voice_sessions_detached")
        figures.sessions_active_after = int(server.health()[1]["sessions_active"])
    summary = figures.summary()
    print(json.dumps({"engine": args.engine, "cuts": args.cuts, "outage_s": args.outage, **summary,
                      "same_session": figures.same_session, "resumed_total": figures.resumed_total,
                      "resume_failures": figures.resume_failures,
                      "sessions_active_after": figures.sessions_active_after,
                      "detached_after": figures.detached_after}))
    if args.json:
        args.json.write_text(json.dumps(asdict(figures) | {"summary": summary}, indent=1))
    ok = (figures.same_session and figures.resumed_total == args.cuts and figures.resume_failures == 0
          and figures.sessions_active_after == 0 and figures.detached_after == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
