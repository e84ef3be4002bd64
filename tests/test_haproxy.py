"""The real HAProxy, running `deploy/haproxy.cfg` unchanged, in front of two real servers on loopback.

Each server has one session slot (two where a test says so; loopback engine, so no model is needed) and
answers HAProxy's agent check on a port of its own (`--agent-port 0`). The config's addresses come from
the environment: HAProxy listens on a socket this process opened (`fd@N`, so no port race) and its runtime
API socket lives in a temporary folder, from which the test reads HAProxy's view of each server (state,
weight, the agent's last answer). Every wait is on a condition (HAProxy's stats, a server's /health or
/metrics, a client's first message or audio), bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from procs.client import ClientRun, stream_client
from procs.network.agent import ServerState, agent_reply, health_reply
from procs.network.http import Health
from protocol import (
    ClientSessionEnd,
    Error,
    ErrorCode,
    SessionEnd,
    SessionStart,
    decode_server,
    encode_client_control,
)
from tests.support.helpers import assert_real_time, metric
from tests.support.launcher import SHM, ServerProcess, wait_gone
from tests.support.proxy import TcpProxy
from tests.support.speech import telugu_speech_16k

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
SERVER_NAMES = ("gpu1", "gpu2")  # the `server` lines of deploy/haproxy.cfg, in order
PRIMARY, OVERFLOW = "voice", "voice_overflow"  # its backends
STICKY_COOKIE = "VOICE_SERVER"  # the primary backend's `cookie`; its values are the server names
POLL_S = 0.02  # how often a bounded wait re-reads the condition; checks run every 200 ms
STATE_TIMEOUT_S = 5.0  # a state change HAProxy should see within one or two 200 ms checks


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail("haproxy is not installed (scripts/setup installs the Debian package)")
    return found


class HAProxy:
    """`haproxy -db -f deploy/haproxy.cfg` in the foreground, its addresses given in the environment."""

    def __init__(self, servers: list[ServerProcess], workdir: Path) -> None:
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
        }
        for name, server in zip(SERVER_NAMES, servers, strict=True):
            env[f"VOICE_{name.upper()}"] = server.url.removeprefix("http://")
            env[f"VOICE_{name.upper()}_AGENT_PORT"] = str(server.agent_port)
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

    def row(self, backend: str, server: str) -> dict[str, str]:
        """One server's `show stat` row; empty while HAProxy does not listen yet."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.states()[(backend, server)]
        except OSError:  # not listening yet
            return {}

    def status(self, backend: str, server: str) -> str:
        """"UP" or "DOWN" (HAProxy writes "DOWN (agent)" when the agent check said so; which of the two
        checks saw it first does not matter here), "unknown" before HAProxy listens."""
        return self.row(backend, server).get("status", "unknown").removesuffix(" (agent)")

    def weight(self, server: str) -> int:
        """The server's weight in the primary backend (of 100: the agent sets it); -1 before HAProxy
        listens."""
        return int(self.row(PRIMARY, server).get("weight", -1))

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


async def first_message_and_close(url: str, cookie: str | None = None) -> tuple[object, int | None]:
    """Open a WebSocket, read the server's first message and wait for the close: (message, close code)."""
    headers = None if cookie is None else {"Cookie": cookie}
    async with connect(url, compression=None, open_timeout=5, additional_headers=headers) as ws:
        first = decode_server(await asyncio.wait_for(ws.recv(), 5))
        await asyncio.wait_for(ws.wait_closed(), 5)
        return first, ws.close_code


async def handshake_status(url: str) -> int:
    try:
        async with connect(url, compression=None, open_timeout=5):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def is_refusal(message: object, close_code: int | None) -> bool:
    return isinstance(message, Error) and message.code == ErrorCode.CAPACITY and close_code == 1013


@dataclass(frozen=True)
class ServerSetup:
    """What each of the two servers gets: ServerSetup() unless a test says
    `@pytest.mark.parametrize("servers", [ServerSetup(...)], indirect=True)`."""

    slots: int = 1
    # SIGTERM drains this long at most, after which a live session hears `server_shutdown`.
    drain_timeout_s: float = 1.0
    # A dropped session is kept this long for a resume: long enough, in the resume tests, for what they do
    # while the link is down on a loaded machine.
    resume_window_s: float = 10.0


def run_showing_logs(scenario: Callable[[], Coroutine[Any, Any, object]], haproxy: HAProxy,
                     servers: Sequence[ServerProcess] = ()) -> None:
    """Run a test's scenario; if it fails, print HAProxy's log and each server's (pytest shows them)."""
    try:
        asyncio.run(scenario())
    except BaseException:
        print("HAProxy log:\n" + haproxy.log())
        for k, server in enumerate(servers):
            name = SERVER_NAMES[k] if len(servers) == len(SERVER_NAMES) else "server"
            print(f"{name} log:\n{server.log()}")
        raise


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[list[ServerProcess]]:
    """Two loopback servers, started side by side, each answering HAProxy's agent check on a free port."""
    setup: ServerSetup = getattr(request, "param", ServerSetup())
    args = ("--engine", "loopback", "--max-sessions", str(setup.slots), "--drain-timeout",
            str(setup.drain_timeout_s), "--agent-port", "0", "--resume-window", str(setup.resume_window_s))
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(ServerProcess, *args) for _ in range(2)]
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
        proxy = HAProxy(servers, Path(workdir))
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
    run_showing_logs(scenario, haproxy)
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


# ---- the agent check ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "active", "slots", "reply"),
    [
        (ServerState.READY, 0, 2, "up 100%\n"),
        (ServerState.READY, 1, 2, "up 50%\n"),
        (ServerState.READY, 2, 2, "0% down #full\n"),
        (ServerState.READY, 1, 3, "up 67%\n"),  # rounded up
        (ServerState.READY, 99, 100, "up 1%\n"),  # one free slot is room: never "0%" while there is one
        (ServerState.READY, 0, 0, "0% down #full\n"),  # an engine with no slot at all
        (ServerState.STARTING, 0, 0, "0% down #starting\n"),
        (ServerState.DRAINING, 1, 2, "0% down #draining\n"),  # free slots do not count while draining
        (ServerState.DRAINING, 0, 2, "0% down #draining\n"),
    ],
)
def test_agent_reply(state: ServerState, active: int, slots: int, reply: str) -> None:
    assert agent_reply(state, active, slots) == reply


@pytest.mark.parametrize("status", ["ok", "full", "starting", "draining"])
def test_agent_and_health_check_agree(status: str) -> None:
    """The agent says `up` exactly when /health is 200 (and `down` when 503), so HAProxy's two checks
    never disagree for long."""
    health = Health(status=status, sessions_active=1 if status == "ok" else 2, max_sessions=2, model="m",
                    engine="loopback", demo_weights=False)
    words = health_reply(health).split("#")[0].split()
    assert ("up" in words) == (health.http_status == 200)
    assert ("down" in words) == (health.http_status == 503)


def read_agent(server: ServerProcess) -> str:
    """What the server's agent answers a connection, read until it closes it."""
    assert server.agent_port is not None, "the READY line named no agent port"
    with socket.create_connection(("127.0.0.1", server.agent_port), timeout=2) as sock:
        return b"".join(iter(lambda: sock.recv(256), b"")).decode()


@contextlib.asynccontextmanager
async def open_session(url: str, cookie: str | None = None) -> AsyncIterator[ClientConnection]:
    """A WebSocket session, open once its `session_start` came, closed normally on the way out."""
    headers = None if cookie is None else {"Cookie": cookie}
    async with connect(url, compression=None, open_timeout=5, additional_headers=headers) as ws:
        first = decode_server(await asyncio.wait_for(ws.recv(), 5))
        assert isinstance(first, SessionStart), first
        yield ws


def sessions_total(server: ServerProcess) -> int:
    """`voice_sessions_total` from the server's /metrics: sessions it has admitted so far."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return int(float(next(ln.split()[1] for ln in lines if ln.startswith("voice_sessions_total"))))


def last_agent_answer(haproxy: HAProxy, name: str) -> str:
    """HAProxy's record of the agent's last status word, e.g. "via agent : down (full)"."""
    return haproxy.row(PRIMARY, name).get("last_agt", "")


def both_up_at(haproxy: HAProxy, weight: int) -> Callable[[], bool]:
    """Both servers UP in the primary backend, at `weight`."""
    return lambda: all(haproxy.status(PRIMARY, n) == "UP" and haproxy.weight(n) == weight
                       for n in SERVER_NAMES)


@pytest.mark.parametrize("servers", [ServerSetup(slots=2, drain_timeout_s=30)], indirect=True)
def test_agent_weight_follows_free_slots(servers: list[ServerProcess], haproxy: HAProxy) -> None:
    """Two slots: weight 100 when empty, 50 with one session, 0 and DOWN when full or draining, while the
    other server stays UP at 100. Sessions are opened on the server itself, not through HAProxy, so which
    server holds them is known."""
    server, name, other_name = servers[0], SERVER_NAMES[0], SERVER_NAMES[1]

    def shows(weight: int, status: str, agent_said: str) -> Callable[[], bool]:
        return lambda: (haproxy.weight(name) == weight and haproxy.status(PRIMARY, name) == status
                        and last_agent_answer(haproxy, name) == f"via agent : {agent_said}")

    async def scenario() -> None:
        await wait_for("both UP at weight 100", both_up_at(haproxy, 100), 15)
        assert await asyncio.to_thread(read_agent, server) == "up 100%\n"
        async with open_session(server.ws_url):
            await wait_for("weight 50 with one of two slots taken", shows(50, "UP", "up"))
            assert await asyncio.to_thread(read_agent, server) == "up 50%\n"
            async with open_session(server.ws_url):
                await wait_for("weight 0 and DOWN when full", shows(0, "DOWN", "down (full)"))
                assert await asyncio.to_thread(read_agent, server) == "0% down #full\n"
                # Still usable by the overflow backend (no agent there); the other server is untouched.
                assert haproxy.status(OVERFLOW, name) == "UP"
                assert haproxy.weight(other_name) == 100 and haproxy.status(PRIMARY, other_name) == "UP"
            await wait_for("weight 50 and UP again when a slot frees", shows(50, "UP", "up"))

            # SIGTERM with a session open: the drain waits for it (up to 30 s); the agent says so meanwhile.
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            await wait_for("weight 0 and DOWN while draining", shows(0, "DOWN", "down (draining)"))
            assert await asyncio.to_thread(read_agent, server) == "0% down #draining\n"
        # The last session ended: the drain is over and the server stops, its agent with it.
        code, _ = await stopping
        assert code == 0, server.log()
        assert f"agent check on port {server.agent_port} closed" in server.log()
        with pytest.raises(ConnectionRefusedError):
            read_agent(server)
        assert haproxy.status(PRIMARY, name) == "DOWN"
        assert haproxy.weight(other_name) == 100 and haproxy.status(PRIMARY, other_name) == "UP"

    run_showing_logs(scenario, haproxy)


# ---- sticky sessions ------------------------------------------------------------------------------------

RECONNECTS = 5


def sticky_cookie_from_page(url: str) -> str:
    """`GET /` through HAProxy: the value of the sticky cookie it sets (a server's name)."""
    with urllib.request.urlopen(url + "/", timeout=5) as page:
        assert page.status == 200
        cookies = [c for c in page.headers.get_all("Set-Cookie") or [] if c.startswith(f"{STICKY_COOKIE}=")]
    assert len(cookies) == 1, cookies
    assert "httponly" in cookies[0].lower()
    return cookies[0].split(";")[0].split("=", 1)[1]


@pytest.mark.parametrize("servers", [ServerSetup(slots=2)], indirect=True)
def test_sticky_sessions_return_to_their_server_while_it_has_room(
    servers: list[ServerProcess], haproxy: HAProxy
) -> None:
    """The cookie from the page brings every reconnect back to the same server; without it, sessions are
    balanced over both; once the sticky server is full, a reconnect goes to the other one and gets its
    cookie. Which server a session reached is read from each server's own `voice_sessions_total`."""

    async def totals() -> list[int]:
        return await asyncio.to_thread(lambda: [sessions_total(s) for s in servers])

    def all_free() -> bool:
        return [sessions_active(s) for s in servers] == [0, 0] and haproxy.current_sessions(PRIMARY) == 0

    async def scenario() -> None:
        await wait_for("both UP at weight 100", both_up_at(haproxy, 100), 15)
        sticky_name = await asyncio.to_thread(sticky_cookie_from_page, haproxy.url)
        sticky = SERVER_NAMES.index(sticky_name)
        other = 1 - sticky
        cookie = f"{STICKY_COOKIE}={sticky_name}"

        before = await totals()
        for _ in range(RECONNECTS):
            async with open_session(haproxy.ws_url, cookie):
                pass
            await wait_for("the session's slot free again", all_free)
        after = await totals()
        assert after[sticky] - before[sticky] == RECONNECTS and after[other] == before[other], (before, after)

        # No cookie: leastconn over two idle servers takes turns, so both get some.
        before = after
        for _ in range(RECONNECTS):
            async with open_session(haproxy.ws_url):
                pass
            await wait_for("the session's slot free again", all_free)
        after = await totals()
        reached = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(reached) == RECONNECTS and min(reached) >= 1, reached

        # The sticky server full (both its slots, reached with the cookie): the reconnect goes elsewhere.
        async with open_session(haproxy.ws_url, cookie), open_session(haproxy.ws_url, cookie):
            assert await asyncio.to_thread(sessions_active, servers[sticky]) == 2
            await wait_for("the full sticky server DOWN",
                           lambda: haproxy.status(PRIMARY, sticky_name) == "DOWN")
            before = await totals()
            async with open_session(haproxy.ws_url, cookie) as ws:
                assert ws.response is not None
                moved_to = ws.response.headers.get("Set-Cookie", "")
            after = await totals()
            assert after[other] == before[other] + 1 and after[sticky] == before[sticky], (before, after)
            # ...and HAProxy gave the client the new server's cookie, so it sticks there from now on.
            assert moved_to.startswith(f"{STICKY_COOKIE}={SERVER_NAMES[other]};"), moved_to

    run_showing_logs(scenario, haproxy)


def agent_answers(server: ServerProcess, line: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return read_agent(server) == line
        except OSError:  # nothing listens (yet)
            return False

    return check


@pytest.mark.parametrize("servers", [ServerSetup(slots=2)], indirect=True)
def test_agent_port_survives_a_network_process_restart(
    servers: list[ServerProcess], haproxy: HAProxy
) -> None:
    """`--agent-port 0` picks a port once: a restarted network process answers on the same one (HAProxy
    keeps asking there), and HAProxy follows its answers again."""
    server, name = servers[0], SERVER_NAMES[0]

    async def scenario() -> None:
        await wait_for("both UP at weight 100", both_up_at(haproxy, 100), 15)
        crashed = server.child_pid("network")
        os.kill(crashed, signal.SIGKILL)
        await wait_for("a new network process",
                       lambda: server.child_pid("network") not in (None, crashed), 30)
        await wait_for("its agent answering on the same port", agent_answers(server, "up 100%\n"), 30)
        async with open_session(server.ws_url):
            await wait_for("HAProxy following the new agent: weight 50 with one session",
                           lambda: haproxy.weight(name) == 50 and haproxy.status(PRIMARY, name) == "UP")

    run_showing_logs(scenario, haproxy, [server])


def test_the_agent_takes_resets_and_silent_checkers_without_an_error() -> None:
    """Scanners and TCP checks that reset the connection at once, or never read, are the agent's everyday
    traffic: each is dropped quietly (no traceback in the log) and the next checker gets its line."""
    with ServerProcess("--engine", "loopback", "--agent-port", "0") as server:
        assert server.agent_port is not None
        silent = [socket.create_connection(("127.0.0.1", server.agent_port)) for _ in range(20)]
        for _ in range(100):
            with socket.socket() as reset:
                reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                reset.connect(("127.0.0.1", server.agent_port))
        with socket.create_connection(("127.0.0.1", server.agent_port), timeout=5) as checker:
            assert checker.makefile("rb").readline() == b"up 100%\n"
        for sock in silent:
            sock.close()
        log = server.log()
    assert "Traceback" not in log and "Unhandled exception" not in log


# ---- resume after a dropped link, behind HAProxy --------------------------------------------------------

RESUMED_WITHIN_S = 2.0  # issue 19's goal: the session resumed within 2 s of the network coming back


class CookieJar:
    """A browser's cookies for the site, as far as WebSocket handshakes go: the `Set-Cookie` of each
    handshake's response (`ws.response.headers`) is kept and sent back as `Cookie` on every later handshake.
    Give `connect` (or `stream_client`, which passes them again on each reconnect)
    `additional_headers=jar.headers, create_connection=jar.connection`: `headers` is one dict, updated in
    place, so the reconnects carry what the first handshake set."""

    def __init__(self) -> None:
        self.cookies: dict[str, str] = {}
        self.headers: dict[str, str] = {}
        jar = self

        class Connection(ClientConnection):
            async def handshake(self, *args: Any, **kwargs: Any) -> None:
                await super().handshake(*args, **kwargs)
                assert self.response is not None
                jar.keep(self.response.headers.get_all("Set-Cookie"))

        self.connection = Connection

    def keep(self, set_cookies: list[str]) -> None:
        for line in set_cookies:
            name, _, value = line.split(";", 1)[0].partition("=")
            self.cookies[name.strip()] = value.strip()
        if self.cookies:
            self.headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())


def detached(server: ServerProcess) -> float:
    """Sessions the server keeps for a resume (their link dropped)."""
    return metric(server, "voice_sessions_detached")


RESUME_METRICS = ("voice_sessions_total", "voice_sessions_resumed_total", "voice_sessions_detached",
                  'voice_resume_failures_total{reason="foreign"}')


def resume_metrics(servers: list[ServerProcess]) -> list[dict[str, float]]:
    return [{name: metric(server, name) for name in RESUME_METRICS} for server in servers]


def growth(before: list[dict[str, float]], after: list[dict[str, float]], name: str) -> list[float]:
    return [a[name] - b[name] for b, a in zip(before, after, strict=True)]


def phone_link_to(haproxy: HAProxy) -> TcpProxy:
    """The network between a phone and HAProxy, which the test cuts and restores."""
    return TcpProxy("127.0.0.1", int(haproxy.url.rsplit(":", 1)[1]))


def phone_client(phone_link: TcpProxy, jar: CookieJar, run: ClientRun, done: asyncio.Event) -> asyncio.Task:
    """A client talking through `phone_link` until `done`, resuming after each drop as the page does, with
    the cookies of `jar`; `run` records it live."""
    pcm = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220) * 8000).astype(np.int16)
    return asyncio.create_task(stream_client(
        phone_link.url(), pcm, repeat_until=done, resume=True, run=run, tail_s=2.0, until_frames=-1,
        additional_headers=jar.headers, create_connection=jar.connection))


async def audio_flows(run: ClientRun, frames: int = 25) -> None:
    """Half a second of audio more comes back (the conversation goes on)."""
    have = len(run.frames)
    await wait_for("audio flowing", lambda: len(run.frames) >= have + frames, 10)


@pytest.mark.parametrize("servers", [ServerSetup(resume_window_s=60)], indirect=True)
def test_a_link_cut_behind_haproxy_resumes_on_the_same_server_by_the_sticky_cookie(
    servers: list[ServerProcess], haproxy: HAProxy
) -> None:
    """A phone's link drops mid-conversation: a TCP proxy between the client and HAProxy is cut (RST both
    ways, no close frame) and restored, twice. The client keeps the cookie HAProxy set on its first
    handshake, as a browser does, and sends it with each `?resume=`: HAProxy brings the resume back to the
    server that holds the detached session, which resumes it (same `session_id`) within 2 s of the network
    coming back.

    One slot per server, so the server holding the session is full, and DOWN in HAProxy's `voice` backend,
    the whole time (its detached session keeps the slot), while the other one has room: plain balancing
    would send every reconnect there. That is what a resume without the cookie gets, deterministically: the
    other server, which does not know the token (`foreign`), and a fresh session with `resume_failed`. The
    second cut comes while the other server is full too, so the resume arrives through `voice_overflow`.
    Which server each session reached is read from each server's own /metrics."""

    def resumed_within_2_s(run: ClientRun, session_id: str, resumes: int, restored_at: float | None) -> None:
        """The client's `resumes`th reconnect resumed the same session, within 2 s of the restore."""
        start = run.session_starts[resumes]
        assert start.resumed and start.session_id == session_id, (start, run.of_type(Error))
        assert restored_at is not None
        took = run.reconnected[resumes - 1] - restored_at
        assert took < RESUMED_WITHIN_S, f"resumed {took:.2f} s after the network came back"

    async def scenario() -> None:
        await wait_for("both UP at weight 100", both_up_at(haproxy, 100), 15)
        before = await asyncio.to_thread(resume_metrics, servers)
        jar, run, done = CookieJar(), ClientRun(), asyncio.Event()
        with phone_link_to(haproxy) as phone_link:
            client = phone_client(phone_link, jar, run, done)
            await audio_flows(run)
            # HAProxy balanced the first handshake (it had no cookie) and named its server in a cookie.
            assert list(jar.cookies) == [STICKY_COOKIE], jar.cookies
            sticky = SERVER_NAMES.index(jar.cookies[STICKY_COOKIE])
            other = 1 - sticky
            assert run.session_start is not None
            session_id = run.session_start.session_id
            opened = growth(before, await asyncio.to_thread(resume_metrics, servers), "voice_sessions_total")
            assert opened[sticky] == 1 and opened[other] == 0, opened
            await wait_for("the sticky server DOWN (full), the other UP (with room)",
                           lambda: haproxy.status(PRIMARY, SERVER_NAMES[sticky]) == "DOWN"
                           and haproxy.status(PRIMARY, SERVER_NAMES[other]) == "UP")

            # The network goes. HAProxy sees its client connection reset and closes the one to the server.
            # After the 101, HAProxy only tunnels bytes and never writes a WebSocket frame, so that server
            # connection ends (FIN or RST) with no close frame: the server detaches the session (kept for
            # a resume, its slot held) as it would on a direct link, rather than ending it. Checked here:
            # the server's log says `connection_lost`, the reason of a connection with no close frame.
            assert await asyncio.to_thread(phone_link.cut) == 1
            await wait_for("the session detached on its server, still holding its slot",
                           lambda: detached(servers[sticky]) == 1 and sessions_active(servers[sticky]) == 1
                           and haproxy.current_sessions(PRIMARY) == 0)
            assert (f"session={session_id} slot=0: connection lost (connection_lost); kept"
                    in servers[sticky].log())

            # A resume WITHOUT the cookie (straight to HAProxy: the phone's link is still down) is balanced
            # to the server with room, the other one: it knows nothing of the token.
            token = run.session_starts[-1].resume_token
            assert token
            async with connect(f"{haproxy.ws_url}?resume={token}", compression=None, open_timeout=5) as ws:
                start = decode_server(await asyncio.wait_for(ws.recv(), 5))
                error = decode_server(await asyncio.wait_for(ws.recv(), 5))
                await ws.send(encode_client_control(ClientSessionEnd()))
                await asyncio.wait_for(ws.wait_closed(), 5)
            assert isinstance(start, SessionStart) and not start.resumed and start.session_id != session_id
            assert isinstance(error, Error) and error.code is ErrorCode.RESUME_FAILED and not error.fatal
            refused = await asyncio.to_thread(resume_metrics, servers)
            assert growth(before, refused, 'voice_resume_failures_total{reason="foreign"}')[other] == 1
            opened = growth(before, refused, "voice_sessions_total")
            assert opened[sticky] == 1 and opened[other] == 1, opened
            await wait_for("the other server free and UP again",
                           lambda: sessions_active(servers[other]) == 0
                           and haproxy.status(PRIMARY, SERVER_NAMES[other]) == "UP")

            # The network comes back: the client resumes with the cookie, and HAProxy sends it to the
            # sticky server although it is DOWN in `voice` (full) and the other one has room.
            await asyncio.to_thread(phone_link.restore)
            await wait_for("a reconnect", lambda: len(run.reconnected) == 1, RESUMED_WITHIN_S + 5)
            resumed_within_2_s(run, session_id, 1, phone_link.restored_at)
            await audio_flows(run)

            # Second cut, with the other server full as well (a session of its own): no server is UP in
            # `voice`, so HAProxy takes the resume to `voice_overflow`, where the cookie must hold too.
            async with open_session(servers[other].ws_url):
                await wait_for("both DOWN in voice", lambda: all(haproxy.status(PRIMARY, n) == "DOWN"
                                                                 for n in SERVER_NAMES))
                # `voice_overflow` follows the cookie, not its own turn (leastconn over two servers with
                # no connection through it takes turns): twice in a row to the server each cookie names,
                # which, full, refuses the newcomer.
                for name in [SERVER_NAMES[other]] * 2 + [SERVER_NAMES[sticky]] * 2:
                    stot = int(haproxy.row(OVERFLOW, name)["stot"])
                    refusal = await first_message_and_close(haproxy.ws_url, f"{STICKY_COOKIE}={name}")
                    assert is_refusal(*refusal), refusal
                    assert int(haproxy.row(OVERFLOW, name)["stot"]) == stot + 1, name
                assert await asyncio.to_thread(phone_link.cut) == 1
                await wait_for("detached again", lambda: detached(servers[sticky]) == 1)
                await asyncio.to_thread(phone_link.restore)
                await wait_for("a reconnect", lambda: len(run.reconnected) == 2, RESUMED_WITHIN_S + 5)
                resumed_within_2_s(run, session_id, 2, phone_link.restored_at)
                await audio_flows(run)
            done.set()
            await asyncio.wait_for(client, 30)

        starts = run.session_starts
        assert [s.session_id for s in starts] == [session_id] * 3, "a resume gave another session"
        assert [s.resumed for s in starts] == [False, True, True]
        assert len(run.drops) == 2 and run.close_code == 1000 and not run.of_type(Error)
        assert list(jar.cookies.values()) == [SERVER_NAMES[sticky]], "HAProxy moved the client elsewhere"
        after = await asyncio.to_thread(resume_metrics, servers)
        resumed = growth(before, after, "voice_sessions_resumed_total")
        assert resumed[sticky] == 2 and resumed[other] == 0, resumed
        # The sticky server admitted one session (resumed twice); the other one the resume without the
        # cookie, and the session that filled it.
        opened = growth(before, after, "voice_sessions_total")
        assert opened[sticky] == 1 and opened[other] == 2, opened
        # No slot left held on either server, nothing detached, no connection left in HAProxy.
        await wait_for("every slot free", lambda: [sessions_active(s) for s in servers] == [0, 0]
                       and haproxy.current_sessions(PRIMARY) == haproxy.current_sessions(OVERFLOW) == 0)
        assert await asyncio.to_thread(lambda: [detached(s) for s in servers]) == [0, 0]
        # The tokens went through HAProxy in the query of every resume: its log has the paths, never them.
        log = haproxy.log()
        assert "/ws" in log
        assert not [s.resume_token for s in starts if s.resume_token and s.resume_token in log]

    run_showing_logs(scenario, haproxy, servers)


def test_a_resume_whose_server_is_gone_gets_a_fresh_session_elsewhere_at_once(
    servers: list[ServerProcess], haproxy: HAProxy
) -> None:
    """The sticky cookie holds for a resume only while its server still serves WebSockets: the link drops,
    and the server keeping the session stops meanwhile (SIGTERM: its drain ends the detached session at
    once). When the network comes back, the resume goes to the other server at once (not to the stopped
    one, HAProxy answering 503 until the client gives up), which starts a fresh session, says
    `resume_failed`, and sets its own cookie."""

    async def scenario() -> None:
        await wait_for("both UP at weight 100", both_up_at(haproxy, 100), 15)
        jar, run, done = CookieJar(), ClientRun(), asyncio.Event()
        with phone_link_to(haproxy) as phone_link:
            client = phone_client(phone_link, jar, run, done)
            await audio_flows(run)
            sticky = SERVER_NAMES.index(jar.cookies[STICKY_COOKIE])
            other = 1 - sticky
            assert await asyncio.to_thread(phone_link.cut) == 1
            await wait_for("the session detached", lambda: detached(servers[sticky]) == 1)
            code, _ = await asyncio.to_thread(servers[sticky].stop)
            assert code == 0, servers[sticky].log()
            await wait_for("the stopped server DOWN everywhere",
                           lambda: haproxy.status(OVERFLOW, SERVER_NAMES[sticky]) == "DOWN"
                           and haproxy.status(PRIMARY, SERVER_NAMES[sticky]) == "DOWN")
            before = await asyncio.to_thread(resume_metrics, [servers[other]])
            await asyncio.to_thread(phone_link.restore)
            await wait_for("a reconnect", lambda: len(run.reconnected) == 1, RESUMED_WITHIN_S + 5)
            assert phone_link.restored_at is not None
            took = run.reconnected[0] - phone_link.restored_at
            assert took < RESUMED_WITHIN_S, f"a session {took:.2f} s after the network came back"
            await audio_flows(run)
            done.set()
            await asyncio.wait_for(client, 30)

        first, fresh = run.session_starts
        assert not fresh.resumed and fresh.session_id != first.session_id
        errors = run.of_type(Error)
        assert [e.code for e in errors] == [ErrorCode.RESUME_FAILED], errors
        assert run.close_code == 1000
        after = await asyncio.to_thread(resume_metrics, [servers[other]])
        assert growth(before, after, 'voice_resume_failures_total{reason="foreign"}') == [1]
        assert growth(before, after, "voice_sessions_total") == [1]
        assert jar.cookies == {STICKY_COOKIE: SERVER_NAMES[other]}, "the client sticks to its new server"
        await wait_for("every slot free", lambda: sessions_active(servers[other]) == 0
                       and haproxy.current_sessions(PRIMARY) == haproxy.current_sessions(OVERFLOW) == 0)

    run_showing_logs(scenario, haproxy, servers)
