"""Side by side: our server and kyutai's reference `moshi.server`, same checkpoint, same speech, on the CPU.

    .venv/bin/python -m bench.compare_reference [--sessions 4] [--seconds 20]

Needs the optional extra `reference` (`pip install "aiohttp>=3.10.5,<3.12" "sphn>=0.2,<0.3"`), espeak-ng
and sox. It runs one scenario per column, each on a freshly started server on 127.0.0.1 — ours, the
reference as shipped and the reference with 1 torch thread (see below), first with 1 session, then with N —
and prints one markdown table, then what each client saw. Every client streams the same Telugu speech
(tests/support/speech.py, repeated to --seconds) at real-time pace in 20 ms frames, starting
as soon as its WebSocket is open; N clients start 80/N ms apart so their frames arrive at different phases.
Both servers load the demo checkpoint (`procs.model.demo.demo_checkpoint_dir()`), each as shipped:
ours with `--checkpoint DIR --max-sessions N` (LM in float32 on the CPU), the reference with its own
defaults (LM in bfloat16; it has no float32 option).

How the reference server is started (the installed package is not edited): this script re-runs itself as
`compare_reference.py serve-reference ARGS`, which
  1. replaces `torch.cuda.synchronize` with a no-op when CUDA is absent: `ServerState.warmup()` calls it
     unconditionally, and on a CPU-only torch it raises, so the server cannot start as shipped;
  2. sets sys.argv to `--host 127.0.0.1 --port P --device cpu --static none --hf-repo DIR --moshi-weight ..
     --mimi-weight .. --tokenizer .. --config-path CFG` and imports `moshi.server`, whose module body calls
     main(). CFG is a copy of the checkpoint's config.json whose file names are rewritten to `file://`
     absolute paths: server.py has no flag for the Mimi config file, and a plain name would be fetched
     from the Hugging Face Hub. `--static none` skips its download of the web client. HF_HUB_OFFLINE=1.
Nothing else is patched: model code, the asyncio.Lock, Opus handling and the protocol are kyutai's.
By default the reference runs twice per N: as shipped (torch's default thread count, one per core) and
with torch.set_num_threads(1) called in its process first (`--reference-threads shipped,1`), because ours
runs one torch thread on the CPU by default, and on 2 busy cores two OpenMP threads can stall a step for
seconds whenever another process holds a core.

Metrics (clients measure everything on their own clock; an "80 ms block" is 4 input frames, one model step):
  - block end: when the client handed block k's last 20 ms frame to the socket. For the reference that
    frame's Opus bytes leave in that very message (its encoder packs 40 ms packets; block ends fall on
    packet ends).
  - answer to block k: the first output audio of the step that consumed block k. Output is mapped to steps
    by counting samples: both servers emit 1920 samples (80 ms at 24 kHz) per step once the LM's acoustic
    delay (max(delays) steps, 1 for the demo) has filled, so output samples [1920 m, 1920 (m+1)) answer block
    m + max(delays). Ours: per 20 ms frame arrival; reference: per Opus packet arrival (each step's 80 ms
    arrive in one message). Ours may skip 0-3 of a new session's frames after its first block to place
    its blocks on the step clock (`skipped_frames` in its `latency` messages) and drops input when it falls
    behind (counted there too): its block k ends with frame skipped + dropped-so-far + 4k + 3 from its
    second block on (see `analyse`).
  - real time: an output sample is on time if it arrives no later than --deadline-ms (default 200) after its
    block's end. Fraction = on-time output audio / the output a session is owed (blocks streamed minus the
    delay-fill blocks, x 80 ms), over all N sessions together.
  - blocks answered: blocks with any answer, at any time, / blocks owed.
  - time to first audio: first output audio arrival - first input frame sent, per session.
  - sessions served at once: the most sessions whose [first, last] output audio arrival intervals overlap.
  - CPU s per session-second: utime + stime of the server's processes (the supervisor and all of its
    descendants; the reference's single process) read from /proc right before the clients connect and after
    the last one closed, / (N x seconds streamed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.reference_client import (
    OursClient,
    ReferenceClient,
    SessionTrace,
    StreamPlan,
    run_sessions,
)
from procs.model.torch_setup import prepare_torch
from protocol import OUT_SAMPLES_PER_BLOCK
from ringbuf.procinfo import read_proc_stat
from tests.support.helpers import FRAME_S
from tests.support.launcher import machine_busy_s, process_tree, role_pids

SERVE_REFERENCE = "serve-reference"
REFERENCE_THREADS_ENV = "COMPARE_REFERENCE_TORCH_THREADS"
BLOCK_FRAMES = 4  # 20 ms frames per 80 ms model step
STEP_SAMPLES = OUT_SAMPLES_PER_BLOCK  # output samples per step at 24 kHz
READY_TIMEOUT_S = 180.0
REFERENCE_READY_LINE = "======== Running on"  # aiohttp's run_app prints it once the socket listens
CHECKPOINT_FILE_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name")


# --- the reference server ------------------------------------------------------------------------


def serve_reference(argv: list[str]) -> None:
    """Runs kyutai's moshi.server in this process with `argv`, making it start without CUDA."""
    import torch

    threads = os.environ.get(REFERENCE_THREADS_ENV)
    if threads:  # only for a --reference-threads number; as shipped, torch picks its default (one per core)
        torch.set_num_threads(int(threads))
    if not torch.cuda.is_available():
        # moshi.server's warm-up ends with an unconditional torch.cuda.synchronize(), which raises on a
        # torch without CUDA; on the CPU there is nothing to synchronise, so a no-op is exact.
        torch.cuda.synchronize = lambda *_args, **_kwargs: None
    sys.argv = ["moshi.server", *argv]
    import moshi.server  # noqa: F401  (its module body parses sys.argv and runs main())


def reference_config(checkpoint_dir: Path, out_dir: Path) -> Path:
    """A copy of the checkpoint's config.json with `file://` absolute paths, so nothing comes from the Hub."""
    config = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
    for key in CHECKPOINT_FILE_KEYS:
        name = config.get(key)
        if name and not name.startswith(("file://", "hf://")):
            config[key] = "file://" + str((checkpoint_dir / name).resolve())
    path = out_dir / "reference_config.json"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ReferenceServer:
    """`moshi.server` on 127.0.0.1 through `serve_reference`, ready once aiohttp says it is listening."""

    def __init__(self, checkpoint_dir: Path, work_dir: Path, threads: int | None = None) -> None:
        config = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
        self.port = free_port()
        args = [
            "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", "--static", "none",
            "--hf-repo", str(checkpoint_dir),
            "--moshi-weight", str(checkpoint_dir / config["moshi_name"]),
            "--mimi-weight", str(checkpoint_dir / config["mimi_name"]),
            "--tokenizer", str(checkpoint_dir / config["tokenizer_name"]),
            "--config-path", str(reference_config(checkpoint_dir, work_dir)),
        ]  # fmt: skip
        env = {**os.environ, "NO_TORCH_COMPILE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop(REFERENCE_THREADS_ENV, None)
        if threads:
            env[REFERENCE_THREADS_ENV] = str(threads)
        self.log_path = work_dir / "reference-server.log"
        # This script again, as a module of bench/ (it runs in work_dir: the repository goes on the path).
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.compare_reference", SERVE_REFERENCE, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=work_dir,
        )  # fmt: skip
        # It logs two lines per model step: the pipe must be drained for the whole run, or it blocks on it.
        self.ready = threading.Event()
        self.drain = threading.Thread(target=self._drain, name="reference-log", daemon=True)
        self.drain.start()
        if not self.ready.wait(READY_TIMEOUT_S) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"reference server not ready; log:\n{self.log_path.read_text()}")
        self.url = f"ws://127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w") as log_file:
            for line in self.proc.stdout:
                log_file.write(line)
                if line.startswith(REFERENCE_READY_LINE):
                    self.ready.set()
        self.ready.set()  # it exited: let the waiter see that

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # aiohttp's run_app shuts down cleanly on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.drain.join()

    def __enter__(self) -> ReferenceServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- CPU accounting --------------------------------------------------------------------------------


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each of `pids` that still runs."""
    return {pid: stat.cpu_s for pid in pids if (stat := read_proc_stat(pid)) is not None}


def own_cpu_seconds() -> float:
    """This process's CPU time: the benchmark clients run here."""
    usage = os.times()
    return usage.user + usage.system


def process_names(root: int, ours: bool) -> dict[int, str]:
    """The server's processes by name: ours are the supervisor and its children named by role (from
    /proc); the reference is one process."""
    if not ours:
        return {root: "moshi.server"}
    return {root: "supervisor", **{pid: role for role, pid in role_pids(root).items()}}


# --- measurements ----------------------------------------------------------------------------------


@dataclass
class SessionStats:
    owed_blocks: int
    answered_blocks: int
    on_time_samples: int
    latencies_s: list[float]
    first_audio_s: float | None  # after the first input frame left
    audio_interval: tuple[float, float] | None  # first and last output audio arrival
    handshake_s: float | None  # after the first input frame left
    connected_s: float | None  # WebSocket open, relative to the first input frame (negative: before it)
    audio_s: float
    dropped_frames: int
    skipped_frames: int
    error: str | None


def analyse(
    trace: SessionTrace, n_frames: int, delay_steps: int, deadline_s: float, skip_frames: int = 0
) -> SessionStats:
    """Maps output samples to the blocks they answer (see the module docstring) and times each.

    The server's k-th block ends with input frame skip + dropped + 4k + 3, where `skip_frames` is how many
    frames the server skipped after the session's first block (k = 0 ends with frame 3) to place its
    blocks on the step clock (ours, from its `latency` messages; the reference never skips) and `dropped`
    the input frames it had dropped before that block, taken from the latest `latency` report that
    arrived before the answer (ours; a drop not yet reported maps later answers to earlier blocks, which
    overstates their latency, never understates it).
    """
    owed = max(0, (n_frames - skip_frames) // BLOCK_FRAMES - delay_steps)
    reports = iter(trace.drop_reports)
    next_report = next(reports, None)
    latencies, on_time, cursor, dropped = [], 0, 0, 0
    for t, samples in trace.audio:
        while next_report is not None and next_report[0] <= t:
            dropped = max(dropped, next_report[1])
            next_report = next(reports, None)
        start, cursor = cursor, cursor + samples
        for unit in range(start // STEP_SAMPLES, min(owed, -(-cursor // STEP_SAMPLES))):
            block = unit + delay_steps
            last_frame = (skip_frames if block else 0) + dropped + BLOCK_FRAMES * block + BLOCK_FRAMES - 1
            if last_frame >= len(trace.send_times):
                break
            block_end = trace.send_times[last_frame]
            lo, hi = max(start, unit * STEP_SAMPLES), min(cursor, (unit + 1) * STEP_SAMPLES)
            if lo == unit * STEP_SAMPLES:  # this message brings the unit's first sample: its answer
                latencies.append(t - block_end)
            if t <= block_end + deadline_s:
                on_time += hi - lo
    t0 = trace.send_times[0] if trace.send_times else None
    return SessionStats(
        owed_blocks=owed,
        answered_blocks=len(latencies),
        on_time_samples=on_time,
        latencies_s=latencies,
        first_audio_s=trace.audio[0][0] - t0 if trace.audio and t0 is not None else None,
        audio_interval=(trace.audio[0][0], trace.audio[-1][0]) if trace.audio else None,
        handshake_s=trace.t_handshake - t0 if trace.t_handshake is not None and t0 is not None else None,
        connected_s=trace.t_connected - t0 if trace.t_connected is not None and t0 is not None else None,
        audio_s=trace.audio_samples / 24_000,
        dropped_frames=trace.server_dropped_frames,
        skipped_frames=skip_frames,
        error=trace.error,
    )


def most_overlapping(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that share a point in time."""
    # At equal times a start sorts before an end: intervals that touch count as overlapping.
    events = sorted([(a, -1) for a, _ in intervals] + [(b, 1) for _, b in intervals])
    best = current = 0
    for _, kind in events:
        current -= kind
        best = max(best, current)
    return best


@dataclass(frozen=True)
class Contender:
    server: str  # "ours" or "reference"
    torch_threads: int | None = None  # reference only; None: as shipped (torch's default, one per core)

    @property
    def label(self) -> str:
        if self.server == "ours" or self.torch_threads is None:
            return self.server
        return f"reference, {self.torch_threads} torch thread{'s' * (self.torch_threads != 1)}"


@dataclass
class Scenario:
    contender: Contender
    sessions: int
    stats: list[SessionStats]
    cpu_s: float
    streamed_s: float  # per session
    wall_s: float
    client_cpu_s: float  # the benchmark's own clients, in this process
    others_cpu_s: float  # everything else on the machine during the run: other people's work
    cpu_by_process: dict[str, float]  # the server's CPU seconds by process name

    @property
    def served_at_once(self) -> int:
        return most_overlapping([s.audio_interval for s in self.stats if s.audio_interval is not None])

    @property
    def real_time_fraction(self) -> float:
        owed = sum(s.owed_blocks for s in self.stats) * STEP_SAMPLES
        return sum(s.on_time_samples for s in self.stats) / owed if owed else 0.0

    @property
    def answered_fraction(self) -> float:
        owed = sum(s.owed_blocks for s in self.stats)
        return sum(s.answered_blocks for s in self.stats) / owed if owed else 0.0

    @property
    def latencies_ms(self) -> np.ndarray:
        return 1000 * np.array([x for s in self.stats for x in s.latencies_s])

    @property
    def cpu_per_session_second(self) -> float:
        return self.cpu_s / (self.sessions * self.streamed_s)


def telugu_speech(seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """The test conversation repeated to `seconds`: int16 at 16 kHz (ours), float32 at 24 kHz (reference)."""
    from procs.audio.resample import Resampler16to24
    from tests.support.speech import conversation_16k

    clip = conversation_16k()
    n_frames = round(seconds / FRAME_S)
    pcm16 = np.resize(clip, n_frames * 320)  # repeats the clip
    pcm24 = Resampler16to24().process(pcm16)
    return pcm16, pcm24.astype(np.float32)


def run_clients(
    server: str,
    url: str,
    sessions: int,
    pcm16: np.ndarray,
    pcm24: np.ndarray,
    tail_s: float,
    patience_s: float,
) -> list[SessionTrace]:
    import uvloop

    n_frames = len(pcm16) // 320

    async def main() -> list[SessionTrace]:
        now = asyncio.get_running_loop().time()
        stagger = BLOCK_FRAMES * FRAME_S / sessions  # spread the sessions' block phases over one step
        plans = [StreamPlan(now + 0.5 + i * stagger, tail_s, patience_s) for i in range(sessions)]
        clients = [
            OursClient(i, pcm16) if server == "ours" else ReferenceClient(i, pcm24) for i in range(sessions)
        ]
        return await run_sessions(clients, url, n_frames, plans)

    return uvloop.run(main())


def run_scenario(
    contender: Contender,
    sessions: int,
    checkpoint_dir: Path,
    work_dir: Path,
    args: argparse.Namespace,
    pcm16: np.ndarray,
    pcm24: np.ndarray,
) -> Scenario:
    from tests.support.launcher import ServerProcess

    delays = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))["delays"]
    n_frames = len(pcm16) // 320
    server = contender.server
    print(f"# {contender.label}, {sessions} session(s): starting the server", file=sys.stderr, flush=True)
    if server == "ours":
        handle = ServerProcess(
            "--checkpoint",
            str(checkpoint_dir),
            "--max-sessions",
            str(sessions),
            ready_timeout=READY_TIMEOUT_S,
        )
        url, root_pid = handle.url.replace("http://", "ws://"), handle.proc.pid
    else:
        handle = ReferenceServer(checkpoint_dir, work_dir, threads=contender.torch_threads)
        url, root_pid = handle.url, handle.proc.pid
    with handle:
        pids = process_tree(root_pid)
        cpu0, before = cpu_by_pid(pids), (own_cpu_seconds(), machine_busy_s(), time.monotonic())
        traces = run_clients(server, url, sessions, pcm16, pcm24, args.tail, args.patience)
        cpu1, after = cpu_by_pid(pids), (own_cpu_seconds(), machine_busy_s(), time.monotonic())
        names = process_names(root_pid, ours=server == "ours")
    if isinstance(handle, ServerProcess):
        Path(handle.log_file.name).unlink(missing_ok=True)  # the launcher keeps it; nothing is read from it
    cpu_by_process: dict[str, float] = {}
    for pid, seconds in cpu1.items():
        name = names.get(pid, "other")
        cpu_by_process[name] = cpu_by_process.get(name, 0.0) + seconds - cpu0.get(pid, 0.0)
    server_cpu = sum(cpu_by_process.values())
    client_cpu, busy, wall = (b - a for a, b in zip(before, after, strict=True))
    unknown = [t.index + 1 for t in traces if server == "ours" and t.skipped_frames is None]
    if unknown:  # the mapping of answers to blocks would be wrong: no figure rather than a wrong one
        raise RuntimeError(f"clients {unknown}: no `latency` message from our server, so the frames it "
                           "skipped to place the session are unknown")
    stats = [analyse(t, n_frames, max(delays), args.deadline_ms / 1000, t.skipped_frames or 0)
             for t in traces]  # fmt: skip
    return Scenario(
        contender, sessions, stats, server_cpu, len(pcm16) / 16_000, wall,
        client_cpu_s=client_cpu, others_cpu_s=max(0.0, busy - server_cpu - client_cpu),
        cpu_by_process=cpu_by_process,
    )  # fmt: skip


# --- the table -------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _ms(values: list[float] | np.ndarray) -> str:
    return f"{np.median(values):.0f}" if len(values) else "—"


def row_values(sc: Scenario) -> dict[str, str]:
    lat = sc.latencies_ms
    firsts = [1000 * s.first_audio_s for s in sc.stats if s.first_audio_s is not None]
    ttfa = f"{np.median(firsts):.0f} / {max(firsts):.0f}" if firsts else "—"
    if len(firsts) < sc.sessions:
        ttfa += f" ({sc.sessions - len(firsts)} got none)"
    return {
        "sessions requested → served at once": f"{sc.sessions} → {sc.served_at_once}",
        "output audio in real time ¹": _pct(sc.real_time_fraction),
        "blocks answered at all ²": _pct(sc.answered_fraction),
        "block end → answer, p50 / p99 (ms) ³": (
            f"{np.percentile(lat, 50):.0f} / {np.percentile(lat, 99):.0f}" if len(lat) else "—"
        ),
        "time to first audio, median / max (ms) ⁴": ttfa,
        "server CPU s per session-second ⁵": f"{sc.cpu_per_session_second:.2f}",
        "input frames the server dropped ⁶": (
            str(sum(s.dropped_frames for s in sc.stats)) if sc.contender.server == "ours" else "not reported"
        ),
    }


def session_lines(sc: Scenario) -> list[str]:
    """What each client of a scenario saw, times after its own first input frame."""
    lines = []
    for i, s in enumerate(sc.stats):
        ws = f"socket open at {s.connected_s:.2f} s" if s.connected_s is not None else "never connected"
        hs = f"handshake at {s.handshake_s:.2f} s" if s.handshake_s is not None else "no handshake"
        fa = f"first audio at {s.first_audio_s:.2f} s" if s.first_audio_s is not None else "no audio"
        lat = f", answer p50 {_ms(1000 * np.array(s.latencies_s))} ms" if s.latencies_s else ""
        err = f", error: {s.error}" if s.error else ""
        if sc.contender.server == "ours":
            err = f", {s.skipped_frames} frames skipped to place it, {s.dropped_frames} dropped" + err
        on_time = s.on_time_samples / (s.owed_blocks * STEP_SAMPLES) if s.owed_blocks else 0.0
        lines.append(
            f"  - client {i + 1}: {ws}, {hs}, {fa}, {s.audio_s:.1f} s of audio received, "
            f"{_pct(on_time)} on time, {s.answered_blocks}/{s.owed_blocks} blocks answered{lat}{err}"
        )
    return lines


def render(scenarios: list[Scenario], args: argparse.Namespace) -> str:
    columns = [row_values(sc) for sc in scenarios]
    head = [f"{sc.contender.label} ×{sc.sessions}" for sc in scenarios]
    out = [
        f"| metric | {' | '.join(head)} |",
        f"| --- | {' | '.join('---' for _ in head)} |",
    ]
    for name in columns[0]:
        out.append(f"| {name} | {' | '.join(col[name] for col in columns)} |")
    streamed = scenarios[0].streamed_s
    out += [
        "",
        f"Each client streamed {streamed:.0f} s of Telugu speech (espeak-ng) at real-time pace on 127.0.0.1; "
        "demo checkpoint on the CPU; one fresh server per column. Ours runs 1 torch thread on the CPU (its "
        "default); the reference as shipped runs torch's default (one per core), and once more with "
        "torch.set_num_threads as named. LM dtype as each ships it on the CPU: ours float32, reference "
        f"bfloat16. N clients start {1000 * BLOCK_FRAMES * FRAME_S / scenarios[-1].sessions:.0f} ms apart.",
        f"¹ output audio that arrived ≤ {args.deadline_ms:.0f} ms after the end of the input block it "
        "answers, / the output owed (blocks streamed minus the acoustic-delay blocks, × 80 ms), all sessions "
        "together.",
        "² blocks with any answer, however late. "
        "³ last 20 ms frame of an 80 ms block handed to the socket → first output audio of the step that "
        "consumed that block (ours: per 20 ms frame; reference: per Opus packet), over all answered blocks; "
        "output is mapped to blocks by counting 1920-sample steps after the acoustic delay, shifted by the "
        "frames ours skipped to place a session on its step clock and the drops it reported. "
        "⁴ first input frame sent → first output audio received. "
        "⁵ utime+stime of all server processes from /proc over the run / (sessions × seconds streamed). "
        "⁶ ours counts the input it dropped when behind (`latency` messages); the reference never drops.",
        "",
        "What each client saw:",
    ]
    for sc in scenarios:
        out.append(
            f"- {sc.contender.label} ×{sc.sessions}: run {sc.wall_s:.1f} s; CPU: server {sc.cpu_s:.1f} s ("
            + ", ".join(f"{name} {sec:.1f}" for name, sec in sorted(sc.cpu_by_process.items()))
            + "), "
            f"benchmark clients {sc.client_cpu_s:.1f} s, other processes on the machine "
            f"{sc.others_cpu_s:.1f} s ({sc.others_cpu_s / sc.wall_s:.2f} of {os.cpu_count()} cores)"
        )
        out += session_lines(sc)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SERVE_REFERENCE]:
        serve_reference(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4, help="N for the concurrent scenarios")
    parser.add_argument("--seconds", type=float, default=20.0, help="speech each client streams")
    parser.add_argument(
        "--deadline-ms", type=float, default=200.0, help="real-time window after a block's end"
    )
    parser.add_argument(
        "--tail", type=float, default=1.0, help="quiet seconds a served client waits at its end"
    )
    parser.add_argument(
        "--patience",
        type=float,
        default=10.0,
        help="seconds a client waits after its last frame for a server that kept it waiting",
    )
    parser.add_argument("--only", choices=("ours", "reference"), help="run one server's scenarios only")
    parser.add_argument(
        "--reference-threads",
        default="shipped,1",
        help="comma-separated reference variants: 'shipped' (torch's default thread count) "
        "and/or a torch.set_num_threads value for each extra column (default: shipped,1)",
    )
    args = parser.parse_args(argv)
    prepare_torch("cpu")  # our side of the comparison runs on the CPU; before moshi is imported

    from procs.model.demo import demo_checkpoint_dir

    checkpoint_dir = demo_checkpoint_dir(progress=lambda m: print(f"# {m}", file=sys.stderr))
    pcm16, pcm24 = telugu_speech(args.seconds)
    references = [Contender("reference", None if v.strip() == "shipped" else int(v))
                  for v in args.reference_threads.split(",") if v.strip()]  # fmt: skip
    contenders = [c for c in [Contender("ours"), *references] if args.only in (None, c.server)]
    plan = [(c, n) for n in dict.fromkeys((1, args.sessions)) for c in contenders]
    with tempfile.TemporaryDirectory(prefix="compare-reference-") as work:
        scenarios = [run_scenario(c, n, checkpoint_dir, Path(work), args, pcm16, pcm24) for c, n in plan]
    print(render(scenarios, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
