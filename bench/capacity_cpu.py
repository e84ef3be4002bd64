"""CPU capacity of the demo checkpoint (random weights, default `moshi` engine) on this machine.

Two measurements, both printed as tables:

1. Step time against batch size: `procs.inference.loader.load_engine("moshi", ...)` in this
   process, all slots ready, with `--threads` torch threads (default: torch's default, which the server's
   inference process also uses unless started with --threads). A batch of B sessions is served in real
   time only if one step takes under 80 ms (one Mimi frame).
2. Sessions held in real time by the running server: for each N, `python supervisor.py --max-sessions N`
   (plus `--threads T` when given) is started fresh and N WebSocket clients (`procs.client.stream_client`,
   at different phases of the block clock) stream Telugu speech at real-time pace for `--seconds`.
   N is *held* when
     - every client got >= 95% of the real-time output frames (from its first output frame to its last send),
     - no client's server-side latency (its per-second `latency` messages, median of `ms`) grew by more
       than 20 ms between the first 10 s after a 5 s warm-up and the last 10 s,
     - no frame was dropped (`voice_input_frames_dropped_total`, `voice_output_frames_dropped_total` and
       the sessions' own `dropped_frames`).
   Next to the verdict it reports where the time goes: the server's step time (`voice_step_seconds`),
   steps per second, the mean number of sessions per step, and the CPU each process used (/proc/PID/stat),
   with the whole machine's busy CPU so that load from other work on the machine shows.

    python -m bench.capacity_cpu [--sessions 2,4,6,8] [--seconds 60] [--step-batches 1,2,4,6,8] [--threads 1]

The helpers at the top (metrics scraping, histogram quantiles, per-process CPU) are shared with
bench/test_bench_server.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from procs.client import ClientRun, stream_client
from procs.model.torch_setup import flush_subnormals, prepare_torch
from protocol import BLOCK_MS, Latency
from tests.support.helpers import FRAME_S
from tests.support.launcher import ServerProcess, cpu_seconds, machine_busy_s, role_pids
from tests.support.speech import conversation_16k, repeat_to

REAL_TIME_SHARE = 0.95
LATENCY_GROWTH_MS = 20.0

# ---------------------------------------------------------------------------------------------------------
# Shared helpers: /metrics, histograms, CPU per process


def scrape_metrics(base_url: str) -> dict[str, float]:
    """`GET /metrics` as {series: value}; a bucket's series keeps its label, e.g. 'x_bucket{le="0.001"}'."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            series[name] = float(value)
    return series


@dataclass
class HistogramDelta:
    """Observations a Prometheus histogram gained between two scrapes."""

    bounds: list[float]  # upper bounds, the last one +inf
    cumulative: list[float]  # observations <= each bound
    total: float
    sum: float

    @classmethod
    def between(cls, before: dict[str, float], after: dict[str, float], name: str) -> HistogramDelta:
        pattern = re.compile(re.escape(name) + r'_bucket\{le="([^"]+)"\}')
        rows = []
        for key, value in after.items():
            if m := pattern.fullmatch(key):
                bound = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
                rows.append((bound, value - before.get(key, 0.0)))
        rows.sort()
        return cls(
            bounds=[b for b, _ in rows],
            cumulative=[c for _, c in rows],
            total=after[f"{name}_count"] - before.get(f"{name}_count", 0.0),
            sum=after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0),
        )

    def fraction_le(self, bound: float) -> float:
        """Exact share of observations <= `bound`; NaN unless `bound` is one of the bucket bounds."""
        if self.total == 0 or bound not in self.bounds:
            return float("nan")
        return self.cumulative[self.bounds.index(bound)] / self.total

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear within the bucket holding rank q; only as exact as the
        buckets are fine (a quantile in the +Inf bucket is reported as the last finite bound)."""
        if self.total == 0:
            return float("nan")
        rank = q * self.total
        lower, below = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative >= rank:
                if bound == float("inf"):
                    return lower
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return lower

    def mean(self) -> float:
        return self.sum / self.total if self.total else float("nan")


@dataclass
class CpuWindow:
    """CPU used per process over a wall-clock window, as % of one core; 'machine' is all work on it."""

    pids: dict[str, int]
    started: float = field(default_factory=time.monotonic)
    start_cpu: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.start_cpu = self._sample()

    def _sample(self) -> dict[str, float]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        cpu["machine"] = machine_busy_s()
        return cpu

    def percent(self) -> dict[str, float]:
        wall = time.monotonic() - self.started
        now = self._sample()
        used = {name: 100.0 * (now[name] - self.start_cpu[name]) / wall for name in now}
        # Clamped: tick-based accounting can put the processes' sum a few % above the machine's total.
        used["others"] = max(0.0, used["machine"] - sum(v for k, v in used.items() if k != "machine"))
        return used


def latency_messages(run: ClientRun) -> list[tuple[float, Latency]]:
    """(seconds since the client's first frame, message) of every `latency` message a client got."""
    return [(t - run.t_first_send, m) for t, m in run.controls if isinstance(m, Latency)]


# ---------------------------------------------------------------------------------------------------------
# 1. Step time against batch size


@dataclass
class StepRow:
    batch: int
    threads: int
    median_ms: float
    p90_ms: float
    max_ms: float
    encode_ms: float
    lm_ms: float
    decode_ms: float

    @property
    def realtime_factor(self) -> float:
        return BLOCK_MS / self.median_ms


def measure_step_times(batches: list[int], rounds: int, threads: int | None = None) -> list[StepRow]:
    """In this process; `threads` sets torch's thread count (None: torch's default, as the server)."""
    import torch

    from procs.inference.loader import load_engine

    if threads:
        torch.set_num_threads(threads)
    log = logging.getLogger("capacity")
    rows = []
    for batch in batches:
        engine = load_engine("moshi", device="cpu",
                             batch_size=batch, log=log)
        engine.warmup()
        rng = np.random.default_rng(batch)
        pcm = (0.1 * rng.standard_normal((batch, engine.frame_samples))).astype(np.float32)
        ready = np.ones(batch, dtype=bool)
        walls, parts = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            result = engine.step_batch(pcm, ready)
            walls.append(time.perf_counter() - t0)
            parts.append((result.encode_s, result.lm_s, result.decode_s))
        ms = np.array(walls) * 1e3
        enc, lm, dec = (float(np.median(col)) * 1e3 for col in zip(*parts, strict=True))
        rows.append(StepRow(batch, torch.get_num_threads(), float(np.median(ms)),
                            float(np.percentile(ms, 90)), float(ms.max()), enc, lm, dec))
        del engine
        gc.collect()
    return rows


def step_table(rows: list[StepRow], rounds: int) -> str:
    lines = [
        f"Demo checkpoint step on the CPU ({rounds} steps per batch, all slots ready; torch threads "
        f"{rows[0].threads if rows else '?'})",
        f"{'batch':>5} {'p50 ms':>7} {'p90 ms':>7} {'max ms':>7} {'ms/sess':>7} {'RT x':>5} "
        f"{'enc ms':>6} {'lm ms':>6} {'dec ms':>6}",
    ]
    for r in rows:
        lines.append(
            f"{r.batch:>5} {r.median_ms:>7.1f} {r.p90_ms:>7.1f} {r.max_ms:>7.1f} "
            f"{r.median_ms / r.batch:>7.1f} "
            f"{r.realtime_factor:>5.2f} {r.encode_ms:>6.1f} {r.lm_ms:>6.1f} {r.decode_ms:>6.1f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# 2. Sessions held in real time by the running server


@dataclass
class CapacityRow:
    sessions: int
    seconds: float
    held: bool
    why_not: str
    min_realtime_share: float  # worst client: output frames received / frames due in real time
    latency_first_ms: float  # worst client: median `latency.ms` in the first window after warm-up
    latency_last_ms: float  # the same client's median in the last window
    max_growth_ms: float  # worst client: last window median - first window median
    worst_p99_ms: float  # largest per-second p99 any client was told after warm-up
    dropped_frames: float  # input and output frames dropped over the run
    steps_per_s: float
    step_p50_ms: float  # from the voice_step_seconds histogram (interpolated within its buckets)
    step_mean_ms: float
    sessions_per_step: float  # voice_step_wait_seconds count / voice_step_seconds count
    wait_mean_ms: float  # mean time a ready block waited for its step
    realigned_total: float  # input frames dropped or repeated to keep sessions on the step clock
    realigned_max: int  # the most any one session needed
    cpu_percent: dict[str, float]  # % of one core per process; the machine has 2 cores = 200 %


def speech_of_length(seconds: float) -> np.ndarray:
    """Telugu conversation (speech and pauses) repeated to `seconds`, cut to whole 80 ms blocks."""
    return repeat_to(conversation_16k(), seconds)


def realtime_share(run: ClientRun) -> float:
    """Output frames received by the last send / frames due in real time since the first one arrived."""
    if not run.frames:
        return 0.0
    t_first = run.frames[0][0]
    due = (run.t_last_send - t_first) / FRAME_S
    got = sum(1 for t, _ in run.frames if t <= run.t_last_send)
    return got / due if due > 0 else 0.0


def latency_growth(run: ClientRun, warmup_s: float, window_s: float) -> tuple[float, float, float]:
    """(first-window median ms, last-window median ms, worst p99 after warm-up) of one client."""
    msgs = latency_messages(run)
    duration = run.t_last_send - run.t_first_send
    window = min(window_s, max(1.0, (duration - warmup_s) / 2))
    first = [m.ms for t, m in msgs if warmup_s <= t < warmup_s + window]
    last = [m.ms for t, m in msgs if duration - window <= t <= duration]
    after = [m.p99_ms for t, m in msgs if t >= warmup_s]
    nan = float("nan")
    return (
        float(np.median(first)) if first else nan,
        float(np.median(last)) if last else nan,
        max(after) if after else nan,
    )


@dataclass(frozen=True)
class Clients:
    """How the clients behave. Default: evenly spread phases, our clock, no jitter. The step-clock benchmark:
    random start phases, clocks `drift_ppm` off ours (half fast, half slow) and sends jittered by up to
    `jitter_ms` either way, as real sound cards and networks are."""

    random_phases: bool = False
    drift_ppm: float = 0.0
    jitter_ms: float = 0.0
    seed: int = 0
    burst: int = 1  # frames sent together, each clump when its last frame is captured (Wi-Fi, 80 ms pages)


async def stream_sessions(url: str, pcm: np.ndarray, n: int, clients: Clients = Clients(),
                          steady: tuple[float, float] | None = None, start_at: float | None = None
                          ) -> tuple[list[ClientRun], list[dict]]:
    """N clients at different phases of the 80 ms block clock (people do not start in step). With `steady`
    (seconds after the first frame), /metrics is also read at those two moments, while every client
    streams: the steady-state window the step figures are taken over. `start_at`: when the first frame is
    due (the loop's clock, time.monotonic), unless that leaves the clients less than 0.5 s to connect."""
    rng = np.random.default_rng(clients.seed)
    offsets = rng.uniform(0, BLOCK_MS / 1000, n) if clients.random_phases else [
        i * BLOCK_MS / 1000 / n + 0.003 * i for i in range(n)]
    start = asyncio.get_running_loop().time() + 0.5  # every client connected before the first frame
    start = start if start_at is None else max(start, start_at)

    def one(i: int) -> asyncio.Task[ClientRun]:
        ppm = clients.drift_ppm if i % 2 == 0 else -clients.drift_ppm
        return asyncio.create_task(stream_client(url, pcm, start_at=start + offsets[i], clock_ppm=ppm,
                                                 jitter_s=clients.jitter_ms / 1000, seed=clients.seed + i,
                                                 burst=clients.burst))

    async def scrape_at(t: float) -> dict:
        await asyncio.sleep(max(0.0, start + t - asyncio.get_running_loop().time()))  # a moment, not a sync
        return await asyncio.to_thread(scrape_metrics, url.removesuffix("/ws").replace("ws://", "http://"))

    scrapes = [asyncio.create_task(scrape_at(t)) for t in steady or ()]
    runs = list(await asyncio.gather(*(one(i) for i in range(n))))
    return runs, [await s for s in scrapes]


def run_capacity(n: int, seconds: float, warmup_s: float = 5.0, window_s: float = 10.0,
                 server_args: tuple[str, ...] = (), clients: Clients = Clients()) -> CapacityRow:
    """A fresh default (demo checkpoint) server with N slots, N clients streaming `seconds` of speech."""
    pcm = speech_of_length(seconds)
    with ServerProcess("--max-sessions", str(n), *server_args) as server:
        pids = {**role_pids(server.proc.pid), "supervisor": server.proc.pid, "client": os.getpid()}
        before = scrape_metrics(server.url)
        cpu = CpuWindow(pids)
        t0 = time.monotonic()
        steady_window = (warmup_s, seconds - 1.0)
        runs, (steady0, steady1) = asyncio.run(stream_sessions(server.ws_url, pcm, n, clients, steady_window))
        wall = time.monotonic() - t0
        cpu_percent = cpu.percent()
        after = scrape_metrics(server.url)
    shares = [realtime_share(r) for r in runs]
    growth = [latency_growth(r, warmup_s, window_s) for r in runs]
    # The client whose latency grew most decides; one without latency messages counts as growing.
    first_ms, last_ms, _ = max(growth, key=lambda g: np.nan_to_num(g[1] - g[0], nan=np.inf))
    session_dropped = max((m.dropped_frames for r in runs for _, m in latency_messages(r)), default=0)
    names = ("voice_input_frames_dropped_total", "voice_output_frames_dropped_total")
    dropped = max(sum(after.get(n, 0.0) - before.get(n, 0.0) for n in names), float(session_dropped))
    # Step figures over the steady window, while every client streams (no start-up or tail).
    steps = HistogramDelta.between(steady0, steady1, "voice_step_seconds")
    waits = HistogramDelta.between(steady0, steady1, "voice_step_wait_seconds")
    steady_s = steady_window[1] - steady_window[0]
    growth_ms = last_ms - first_ms
    reasons = []
    if min(shares) < REAL_TIME_SHARE:
        reasons.append(f"real-time share {min(shares):.1%} < {REAL_TIME_SHARE:.0%}")
    if not growth_ms <= LATENCY_GROWTH_MS:  # also catches NaN (no latency messages)
        reasons.append(f"latency grew {growth_ms:+.0f} ms")
    if dropped:
        reasons.append(f"{dropped:.0f} frames dropped")
    return CapacityRow(
        sessions=n,
        seconds=wall,
        held=not reasons,
        why_not="; ".join(reasons),
        min_realtime_share=min(shares),
        latency_first_ms=first_ms,
        latency_last_ms=last_ms,
        max_growth_ms=growth_ms,
        worst_p99_ms=float(np.nanmax([g[2] for g in growth])),
        dropped_frames=dropped,
        steps_per_s=steps.total / steady_s,
        step_p50_ms=steps.quantile(0.5) * 1e3,
        step_mean_ms=steps.mean() * 1e3,
        sessions_per_step=waits.total / steps.total if steps.total else float("nan"),
        wait_mean_ms=waits.mean() * 1e3,
        realigned_total=after.get("voice_input_frames_realigned_total", 0.0)
        - before.get("voice_input_frames_realigned_total", 0.0),
        realigned_max=max((getattr(r.of_type(Latency)[-1], "realigned_frames", 0)  # 0: a pre-clock server
                           for r in runs if r.of_type(Latency)),
                          default=0),
        cpu_percent=cpu_percent,
    )


def capacity_table(rows: list[CapacityRow], seconds: float, server_args: tuple[str, ...] = ()) -> str:
    lines = [
        f"Demo checkpoint served by the running server ({' '.join(server_args) or 'default flags'}), "
        f"{seconds:.0f} s of real-time Telugu speech per client",
        f"{'N':>2} {'held':>4} {'RT share':>8} {'lat first':>9} {'lat last':>8} {'p99 max':>7} {'drop':>5} "
        f"{'steps/s':>7} {'step p50':>8} {'step avg':>8} {'sess/step':>9} {'wait avg':>8} {'realign':>7}  "
        f"CPU % of one core (network inference vad client | others on the machine)",
    ]
    for r in rows:
        c = r.cpu_percent
        lines.append(
            f"{r.sessions:>2} {'yes' if r.held else 'NO':>4} {r.min_realtime_share:>8.1%} "
            f"{r.latency_first_ms:>9.1f} {r.latency_last_ms:>8.1f} {r.worst_p99_ms:>7.1f} "
            f"{r.dropped_frames:>5.0f} {r.steps_per_s:>7.2f} {r.step_p50_ms:>8.1f} {r.step_mean_ms:>8.1f} "
            f"{r.sessions_per_step:>9.2f} {r.wait_mean_ms:>8.1f} "
            f"{r.realigned_total:>4.0f}/{r.realigned_max:<2d}  "
            f"{c.get('network', 0):>4.0f} {c.get('inference', 0):>4.0f} {c.get('vad', 0):>4.0f} "
            f"{c.get('client', 0):>4.0f} | {c.get('others', 0):>4.0f}"
            + (f"   ({r.why_not})" if r.why_not else "")
        )
    held = [r.sessions for r in rows if r.held]
    below = 0
    for r in sorted(rows, key=lambda r: r.sessions):
        if not r.held:
            break
        below = r.sessions
    lines.append(
        f"Most sessions held: {max(held) if held else 0}; held at every N tried up to {below}. "
        "Latency in ms; lat first/last: median of the worst client's per-second `latency.ms` in the first "
        "window after warm-up and in the last window; step and wait from the server's histograms; realign: "
        "input frames realigned to the step clock in all / the most in one session."
    )
    return "\n".join(lines)


def ensure_demo_checkpoint() -> None:
    """Build (or find cached) the demo checkpoint, so that no server start includes the build."""
    subprocess.run([sys.executable, "-m", "procs.model.build_demo"], check=True,
                   capture_output=True)


def parse_counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from error
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"counts must be positive: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=parse_counts, default=[2, 4, 6, 8],
                        help="session counts to try against the server (default 2,4,6,8; empty: skip)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds each client streams")
    parser.add_argument("--step-batches", type=parse_counts, default=[1, 2, 4, 6, 8],
                        help="batch sizes for the in-process step timing (default 1,2,4,6,8; empty: skip)")
    parser.add_argument("--step-rounds", type=int, default=30, help="timed steps per batch size")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds left out before the first window")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of each latency window")
    parser.add_argument("--threads", type=int, help="torch threads, for the step timing and the server's "
                        "inference process (--threads); default: torch's default, as the server has it")
    parser.add_argument("--random-phases", action="store_true",
                        help="clients start at random phases of the 80 ms clock (default: evenly spread)")
    parser.add_argument("--drift-ppm", type=float, default=0.0,
                        help="client clocks this far off ours, half fast and half slow (e.g. 300)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="each send moved by up to this much")
    parser.add_argument("--seed", type=int, default=0, help="for the phases and the jitter")
    parser.add_argument("--burst", type=int, default=1,
                        help="clients send their frames in clumps of this many (4: one 80 ms page at a time)")
    parser.add_argument("--keep-subnormals", action="store_true",
                        help="step timing without flushing subnormal floats (the server flushes them)")
    parser.add_argument("--server-args", default="",
                        help="more flags for the server, e.g. '--engine loopback --step-clock on' (the clock "
                        "alone, no model cost)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    clients = Clients(args.random_phases, args.drift_ppm, args.jitter_ms, args.seed, args.burst)
    prepare_torch("cpu")  # the step timing runs the demo model here; before moshi is imported
    if not args.keep_subnormals:
        flush_subnormals("cpu")  # as the server's inference process does
    if args.seconds < 2 * args.window + args.warmup:
        print(f"note: {args.seconds:.0f} s is short for two {args.window:.0f} s windows after warm-up; "
              "the windows shrink and overlap", file=sys.stderr)

    ensure_demo_checkpoint()

    server_args = (*(("--threads", str(args.threads)) if args.threads else ()), *args.server_args.split())
    step_rows = measure_step_times(args.step_batches, args.step_rounds, args.threads)
    if step_rows:
        print(step_table(step_rows, args.step_rounds), flush=True)
    capacity_rows = []
    for n in args.sessions:
        row = run_capacity(n, args.seconds, args.warmup, args.window, server_args, clients)
        capacity_rows.append(row)
        print(f"N={n}: {'held' if row.held else 'NOT held: ' + row.why_not}", file=sys.stderr, flush=True)
    if capacity_rows:
        print(capacity_table(capacity_rows, args.seconds, server_args), flush=True)
    if args.json:
        results = {"steps": [asdict(r) for r in step_rows], "capacity": [asdict(r) for r in capacity_rows]}
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
