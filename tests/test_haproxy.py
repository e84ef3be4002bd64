"""The real HAProxy, running `deploy/haproxy.cfg` unchanged, in front of two real servers on loopback.

Each server has one session slot (loopback engine, so no model is needed). The config's addresses come
from the environment: HAProxy listens on a socket this process opened (`fd@N`, so no port race) and its
runtime API socket lives in a temporary folder, from which the test reads HAProxy's view of each server.
Every wait is on a condition (HAProxy's stats, a server's /health, a client's first audio), bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from procs.audio.speech import telugu_speech_16k
from procs.client import ClientRun, stream_client
from procs.launcher import SHM, ServerProcess, wait_gone
from protocol import Error, ErrorCode, SessionEnd, decode_server

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
SERVER_NAMES = ("gpu1", "gpu2")  # the `server` lines of deploy/haproxy.cfg, in order
PRIMARY, OVERFLOW = "voice", "voice_overflow"  # its backends
FRAME_S = 0.02
POLL_S = 0.02  # how often a bounded wait re-reads the condition; checks run every 200 ms
STATE_TIMEOUT_S = 5.0  # a state change HAProxy should see within one or two 200 ms checks


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("haproxy is not installed (scripts/setup installs the Debian package)")
    return found


class HAProxy:
    """`haproxy -db -f deploy/haproxy.cfg` in the foreground, its addresses given in the environment."""

    def __init__(self, backends: list[str], workdir: Path) -> None:
        # HAProxy inherits a listening socket opened here: its port is known, and nothing can take it.
        listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"
        self.stats_socket = workdir / "admin.sock"
        self.log_path = workdir / "haproxy.log"
        env = {
            **os.environ,
            "VOICE_LB_BIND": f"fd@{listener.fileno()}",
            "VOICE_LB_STATS_SOCKET": str(self.stats_socket),
            **{
                f"VOICE_{name.upper()}": address for name, address in zip(SERVER_NAMES, backends, strict=True)
            },
        }
        with listener, open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", str(HAPROXY_CFG)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                pass_fds=[listener.fileno()],
            )

    def log(self) -> str:
        return self.log_path.read_text()

    def states(self) -> dict[tuple[str, str], dict[str, str]]:
        """`show stat` from the runtime API: {(backend, server): row}, e.g. row["status"] == "UP"."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            raw = b"".join(iter(lambda: sock.recv(65536), b""))
        rows = csv.DictReader(io.StringIO(raw.decode().removeprefix("# ")))
        return {(r["pxname"], r["svname"]): r for r in rows if r["svname"] in SERVER_NAMES}

    def status(self, backend: str, server: str) -> str:
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.states()[(backend, server)]["status"]
        except OSError:  # not listening yet
            return "unknown"

    def current_sessions(self, backend: str) -> int:
        """Connections the backend's servers hold now, as HAProxy counts them for leastconn."""
        return sum(int(row["scur"]) for (proxy, _), row in self.states().items() if proxy == backend)

    def sessions_total(self, backend: str) -> int:
        """Connections the backend's servers have been given so far (health checks excluded)."""
        return sum(int(row["stot"]) for (proxy, _), row in self.states().items() if proxy == backend)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # hard stop: with -db there is no master process to outlive it
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def sessions_active(server: ServerProcess) -> int:
    return http_get(server.url + "/health")[1]["sessions_active"]


def frames_out(server: ServerProcess) -> float:
    """`voice_frames_out_total` from the server's /metrics: audio frames it has sent to clients."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return float(next(ln.split()[1] for ln in lines if ln.startswith("voice_frames_out_total")))


async def wait_for(what: str, condition: Callable[[], bool], timeout: float = STATE_TIMEOUT_S) -> float:
    """Poll `condition` (run off the event loop: it does blocking I/O) until true; returns seconds taken."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(condition):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - t0


async def first_message_and_close(url: str) -> tuple[object, int | None]:
    """Open a WebSocket, read the server's first message and wait for the close: (message, close code)."""
    async with connect(url, compression=None, open_timeout=5) as ws:
        first = decode_server(await asyncio.wait_for(ws.recv(), 5))
        await asyncio.wait_for(ws.wait_closed(), 5)
        return first, ws.close_code


async def handshake_status(url: str) -> int:
    try:
        async with connect(url, compression=None, open_timeout=5):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def assert_real_time(run: ClientRun) -> None:
    """Audio came back in 960-byte frames at >= 90% of the real-time rate until the client stopped
    sending or the server ended the session."""
    assert run.session_start is not None
    assert not run.bad_frames
    assert run.frames, "no audio came back"
    ends = [t for t, m in run.controls if isinstance(m, SessionEnd)]
    until = run.t_last_send or ends[0]
    due = (until - run.frames[0][0]) / FRAME_S
    got = sum(1 for t, _ in run.frames if t <= until)
    assert got >= 0.9 * due, f"{got} frames back while {due:.0f} were due"


def is_refusal(message: object, close_code: int | None) -> bool:
    return isinstance(message, Error) and message.code == ErrorCode.CAPACITY and close_code == 1013


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Two loopback servers with one slot each, started side by side."""
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        starting = [
            # SIGTERM drains: 1 s here, after which a live session hears `server_shutdown`.
            pool.submit(ServerProcess, "--engine", "loopback", "--max-sessions", "1", "--drain-timeout", "1")
            for _ in range(2)
        ]
        started, failed = [], []
        for future in starting:
            try:
                started.append(stack.enter_context(future.result()))
            except Exception as e:  # keep the other one, so that the stack stops it
                failed.append(e)
        if failed:
            raise failed[0]
        yield started


@pytest.fixture
def haproxy(servers: list[ServerProcess]) -> Iterator[HAProxy]:
    with tempfile.TemporaryDirectory(prefix="haproxy-") as workdir:
        proxy = HAProxy([s.url.removeprefix("http://") for s in servers], Path(workdir))
        try:
            yield proxy
        finally:
            proxy.stop()
            assert not wait_gone([proxy.proc.pid], timeout=5)


def test_haproxy_spreads_sessions_refuses_when_full_and_drains(
    servers: list[ServerProcess], haproxy: HAProxy
) -> None:
    pcm = telugu_speech_16k()[: 6 * 16000]
    timings: dict[str, float] = {}

    def all_are(backend: str, status: str, names: tuple[str, ...] = SERVER_NAMES) -> Callable[[], bool]:
        return lambda: all(haproxy.status(backend, name) == status for name in names)

    async def timed(name: str, waiting: Awaitable[float]) -> None:
        timings[name] = await waiting

    def up_with_sessions(count: int) -> Callable[[], bool]:
        """Both servers UP in the primary backend, and HAProxy counting `count` sessions on them in all."""
        return lambda: all_are(PRIMARY, "UP")() and haproxy.current_sessions(PRIMARY) == count

    async def scenario() -> None:
        await timed("haproxy_sees_both_up", wait_for("both servers UP and empty", up_with_sessions(0), 15))

        # Two clients, one per server. leastconn sends a newcomer to the server with fewer sessions, as
        # HAProxy counts them: the second client starts once HAProxy counts the first one's session (two
        # connections arriving together may both see two empty servers).
        started = [asyncio.Event(), asyncio.Event()]
        clients = [asyncio.create_task(stream_client(haproxy.ws_url, pcm, first_audio=started[0]))]
        await asyncio.wait_for(started[0].wait(), 10)
        await wait_for("HAProxy counts the first session", lambda: haproxy.current_sessions(PRIMARY) == 1)
        clients.append(asyncio.create_task(stream_client(haproxy.ws_url, pcm, first_audio=started[1])))
        await asyncio.wait_for(started[1].wait(), 10)
        assert [await asyncio.to_thread(sessions_active, s) for s in servers] == [1, 1]

        # Both full: /health 503 "full" takes both out of the primary backend, not out of the overflow one.
        await timed("full_to_down", wait_for("both DOWN when full", all_are(PRIMARY, "DOWN")))
        assert all_are(OVERFLOW, "UP")(), haproxy.states()
        # A third client reaches a full server through the overflow backend and hears the server's own
        # refusal, which a browser can show ("The server is full"), instead of a bare 503 handshake failure.
        overflow_before = await asyncio.to_thread(haproxy.sessions_total, OVERFLOW)
        message, code = await first_message_and_close(haproxy.ws_url)
        assert is_refusal(message, code), (message, code)
        assert await asyncio.to_thread(haproxy.sessions_total, OVERFLOW) == overflow_before + 1
        assert [await asyncio.to_thread(sessions_active, s) for s in servers] == [1, 1]
        # ...and the page itself still loads.
        page = await asyncio.to_thread(urllib.request.urlopen, haproxy.url + "/", timeout=5)
        with page:
            assert page.status == 200 and b"<html" in page.read().lower()

        # Let both sessions stream for a second (50 frames each) before one is cut short.
        await wait_for("1 s of audio from each server", lambda: min(map(frames_out, servers)) >= 50, 10)

        # Draining: SIGTERM the first server. Its client hears goodbye; HAProxy stops using it.
        t_term = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(servers[0].stop))
        done, _ = await asyncio.wait(clients, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no client ended after SIGTERM"
        drained = done.pop()
        survivor = clients[1 - clients.index(drained)]
        timings["sigterm_to_client_closed"] = time.monotonic() - t_term
        stopped_name, survivor_name = SERVER_NAMES
        await timed("drain_to_down", wait_for("SIGTERMed DOWN", all_are(OVERFLOW, "DOWN", (stopped_name,))))
        assert haproxy.status(PRIMARY, stopped_name) == "DOWN"
        assert not survivor.done(), "the other server's client must go on"

        # While the survivor is full, newcomers are still told "full" (by the survivor itself).
        message, code = await first_message_and_close(haproxy.ws_url)
        assert is_refusal(message, code), (message, code)
        code, took = await stopping
        assert code == 0, servers[0].log()
        timings["sigterm_to_exit"] = took

        # The survivor's client finishes; its slot frees; HAProxy routes a newcomer there.
        survivor_run = await asyncio.wait_for(survivor, 15)
        await timed("free_to_up", wait_for("survivor UP when free", all_are(PRIMARY, "UP", (survivor_name,))))
        got_audio = asyncio.Event()
        newcomer = asyncio.create_task(stream_client(haproxy.ws_url, pcm[: 2 * 16000], first_audio=got_audio))
        await asyncio.wait_for(got_audio.wait(), 10)
        assert await asyncio.to_thread(sessions_active, servers[1]) == 1
        newcomer_run = await newcomer

        # No server left at all: the overflow backend is empty too, and HAProxy answers 503 itself.
        code, _ = await asyncio.to_thread(servers[1].stop)
        assert code == 0, servers[1].log()
        await wait_for("both DOWN everywhere", all_are(OVERFLOW, "DOWN"))
        assert await handshake_status(haproxy.ws_url) == 503

        drained_run = drained.result()
        ends = drained_run.of_type(SessionEnd)
        assert ends and isinstance(ends[-1], SessionEnd) and ends[-1].reason == "server_shutdown"
        assert drained_run.close_code == 1001
        assert survivor_run.close_code == 1000 and newcomer_run.close_code == 1000
        for run in (drained_run, survivor_run, newcomer_run):
            assert_real_time(run)
        # Loopback: every frame the survivor and the newcomer sent came back, once.
        assert len(survivor_run.frames) == survivor_run.sent
        assert len(newcomer_run.frames) == newcomer_run.sent
        assert len({r.session_start.session_id for r in (drained_run, survivor_run, newcomer_run)}) == 3

    t0 = time.monotonic()
    try:
        asyncio.run(scenario())
    except BaseException:
        print("HAProxy log:\n" + haproxy.log())
        raise
    timings["scenario"] = time.monotonic() - t0
    # Both servers were stopped by the scenario: nothing of theirs may be left behind.
    for server in servers:
        assert not wait_gone([server.proc.pid, *server.children], timeout=5)
        assert not list(SHM.glob(f"vring-{server.proc.pid}-*"))
    print(" ".join(f"{k}={v:.3f}s" for k, v in timings.items()))
    assert haproxy.proc.poll() is None, haproxy.log()


def test_config_is_valid_with_its_defaults() -> None:
    """The file as users get it, with no VOICE_* variables set, passes `haproxy -c`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_")}
    out = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stdout + out.stderr
