"""The server under hostile clients and failing children, for real: the supervisor and its processes, real
sockets on loopback, real signals. Each test is one attack; each would fail without the rule it checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from procs.client import ClientRun, messages_until_closed, stream_client
from procs.fdlimit import RESERVE_FDS
from procs.network.auth import mint_token
from protocol import (
    IN_FRAME_BYTES,
    Draining,
    Error,
    ErrorCode,
    SessionEnd,
    SessionStart,
    Vad,
    decode_server,
    encode_client_audio,
)
from tests.support.launcher import SHM, ServerProcess, poll_until, wait_gone
from tests.support.speech import telugu_speech_for

# Listen until every frame sent is answered (the loopback engine answers each), 5 s at most.
ALL_BACK = {"until_frames": -1, "tail_s": 5.0}

LOOPBACK = ("--engine", "loopback")
FRAME = encode_client_audio(bytes(IN_FRAME_BYTES))
BOUND_S = 15.0  # every wait here is for a condition, bounded by this


def wait_until(what: str, condition, timeout: float = BOUND_S) -> float:
    took = poll_until(condition, timeout)
    assert took is not None, f"not within {timeout} s: {what}"
    return took


# ---- slots and strangers -----------------------------------------------------------------------------------


def test_idle_sessions_are_closed_and_give_their_slots_back() -> None:
    with ServerProcess(*LOOPBACK, "--max-sessions", "2", "--idle-timeout", "1") as server:

        async def idle() -> tuple[list[object], int | None]:
            async with connect(server.ws_url) as ws:
                got = await asyncio.wait_for(messages_until_closed(ws), BOUND_S)
                return got, ws.close_code

        async def scenario() -> list[tuple[list[object], int | None]]:
            return list(await asyncio.gather(idle(), idle()))

        t0 = time.monotonic()
        for got, code in asyncio.run(scenario()):
            errors = [m for m in got if isinstance(m, Error)]
            assert errors and errors[-1].code == ErrorCode.IDLE_TIMEOUT and errors[-1].fatal and code == 1000
        assert time.monotonic() - t0 < 5
        wait_until("both slots free", lambda: server.health()[1].get("sessions_active") == 0)
        run = asyncio.run(stream_client(server.ws_url, telugu_speech_for(2), **ALL_BACK))
        assert run.close_code == 1000 and len(run.frames) == run.sent
        assert "ended (idle_timeout)" in server.log()


def test_a_session_time_limit_ends_sessions_with_a_goodbye() -> None:
    with ServerProcess(*LOOPBACK, "--max-session-s", "1") as server:
        run = asyncio.run(stream_client(server.ws_url, telugu_speech_for(3), end_session=False))
        assert any(isinstance(m, Error) and m.code == ErrorCode.TIME_LIMIT for m in run.of_type(Error))
        assert run.of_type(SessionEnd)[-1].reason == "time_limit" and run.close_code == 1000


def test_only_allowed_origins_may_open_sessions() -> None:
    async def status(url: str, origin: str | None) -> int:
        headers = {"Origin": origin} if origin else {}
        try:
            async with connect(url, additional_headers=headers) as ws:
                assert isinstance(decode_server(await ws.recv()), SessionStart)
                return 101
        except InvalidStatus as e:
            return e.response.status_code

    with ServerProcess(*LOOPBACK) as server:
        port = server.url.rsplit(":", 1)[1]
        assert asyncio.run(status(server.ws_url, "https://evil.example")) == 403
        assert asyncio.run(status(server.ws_url, "null")) == 403
        assert asyncio.run(status(server.ws_url, f"http://127.0.0.1:{port}")) == 101  # the page's own
        assert asyncio.run(status(server.ws_url, None)) == 101  # no browser: the token's job
    with ServerProcess(*LOOPBACK, "--allowed-origins", "https://app.example") as server:
        assert asyncio.run(status(server.ws_url, "https://app.example")) == 101
        assert asyncio.run(status(server.ws_url, "https://evil.example")) == 403


def test_tokens_are_checked_before_a_slot_is_taken_and_never_logged() -> None:
    shared, secret = "shared-token-0123456789", "signing-secret-0123456789"

    async def status(url: str) -> int:
        try:
            async with connect(url) as ws:
                assert isinstance(decode_server(await ws.recv()), SessionStart)
                return 101
        except InvalidStatus as e:
            return e.response.status_code

    with ServerProcess(*LOOPBACK, "--max-sessions", "1", "--auth-token", shared, "--auth-secret", secret,
                       "--log-level", "DEBUG") as server:
        assert asyncio.run(status(server.ws_url)) == 401
        for _ in range(5):  # refusals hold no slot
            assert asyncio.run(status(server.ws_url + "?token=wrong-token-0123456789")) == 403
        assert asyncio.run(status(server.ws_url + "?token=" + shared)) == 101
        signed = mint_token(secret, ttl_s=60, now=time.time())
        assert asyncio.run(status(server.ws_url + "?token=" + signed)) == 101
        expired = mint_token(secret, ttl_s=60, now=time.time() - 120)
        assert asyncio.run(status(server.ws_url + "?token=" + expired)) == 403
        log = server.log()
    assert shared not in log and signed not in log and secret not in log


def test_a_client_that_stops_reading_finds_a_bounded_backlog_when_it_resumes() -> None:
    """It stops reading for 8 s. What waits for it is bounded: 200 ms in the session's queue plus the kernel's
    socket buffers (the server's send buffer is kept small; the client's own receive buffer is the
    client's); everything else is dropped on the server and counted, so every frame is accounted for."""
    with ServerProcess(*LOOPBACK) as server:

        async def scenario() -> tuple[int, int]:
            async with connect(server.ws_url) as ws:
                assert isinstance(decode_server(await ws.recv()), SessionStart)
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                ws.transport.pause_reading()
                for i in range(400):  # 8 s at real-time pace
                    await asyncio.sleep(max(0.0, t0 + i * 0.02 - loop.time()))  # pacing, as a microphone
                    await ws.send(FRAME)
                ws.transport.resume_reading()
                waited = 0
                with contextlib.suppress(TimeoutError):
                    while True:  # what waited for the client, until nothing more comes
                        message = await asyncio.wait_for(ws.recv(), 0.5)
                        waited += isinstance(message, bytes)
                return waited, 400

        waited, sent = asyncio.run(scenario())
        with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
            metrics = r.read().decode()
        dropped = float(re.search(r"^voice_output_frames_dropped_total (\S+)$", metrics, re.M).group(1))
    assert waited <= sent // 2, f"{waited} of {sent} frames waited for the client"
    assert sent - waited - 4 <= dropped <= sent - waited  # every frame delivered or counted


def test_audio_far_faster_than_real_time_is_refused_then_closed_and_spares_a_neighbour() -> None:
    with ServerProcess(*LOOPBACK, "--max-sessions", "2") as server:

        async def flood() -> tuple[list[object], int | None]:
            async with connect(server.ws_url) as ws:
                reader = asyncio.create_task(messages_until_closed(ws))
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(2000):
                        await ws.send(FRAME)
                got = await asyncio.wait_for(reader, BOUND_S)
                return got, ws.close_code

        async def scenario() -> tuple[ClientRun, tuple[list[object], int | None]]:
            neighbour = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(4), **ALL_BACK))
            await asyncio.sleep(0.5)  # a start offset, not synchronisation
            flooded = await flood()
            return await neighbour, flooded

        neighbour, (got, code) = asyncio.run(scenario())
        errors = [m for m in got if isinstance(m, Error)]
        assert errors and all(e.code == ErrorCode.RATE_LIMITED for e in errors) and code == 1008
        assert len(neighbour.frames) == neighbour.sent and not neighbour.of_type(Error)
        assert server.log().count("audio faster than real time") <= 3  # warnings are rate-limited too


def test_a_message_over_the_largest_legal_one_is_closed_1009_and_logged_as_such() -> None:
    with ServerProcess(*LOOPBACK) as server:

        async def oversize() -> int | None:
            async with connect(server.ws_url, max_size=None) as ws:
                await ws.recv()
                await ws.send("x" * 5000)
                await asyncio.wait_for(messages_until_closed(ws), BOUND_S)
                return ws.close_code

        assert asyncio.run(oversize()) == 1009
        wait_until("the close logged", lambda: "ended (message_too_big)" in server.log())


# ---- children that hang or die -----------------------------------------------------------------------------


def test_a_hung_inference_process_is_noticed_its_sessions_told_and_it_is_replaced() -> None:
    with ServerProcess(*LOOPBACK) as server:
        pid = server.child_pid("inference")

        async def scenario() -> ClientRun:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(20),
                                                       first_audio=streaming, end_session=False))
            await streaming.wait()
            os.kill(pid, signal.SIGSTOP)
            return await asyncio.wait_for(client, 30)

        run = asyncio.run(scenario())
        errors = run.of_type(Error)
        assert errors and errors[-1].code == ErrorCode.INTERNAL and run.close_code == 1011
        assert "inference" in server.log() and "no heartbeat" in server.log()
        wait_until("a new inference process ready", lambda: server.health()[0] == 200, 30)
        assert server.child_pid("inference") not in (None, pid)
        after = asyncio.run(stream_client(server.ws_url, telugu_speech_for(2), **ALL_BACK))
        assert len(after.frames) == after.sent


def test_a_vad_crash_costs_no_session_and_speech_events_resume() -> None:
    with ServerProcess(*LOOPBACK) as server:
        pid = server.child_pid("vad")

        async def scenario() -> tuple[ClientRun, float]:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(16),
                                                       first_audio=streaming, **ALL_BACK))
            await streaming.wait()
            killed_at = asyncio.get_running_loop().time()
            os.kill(pid, signal.SIGKILL)
            return await client, killed_at

        run, killed_at = asyncio.run(scenario())
        assert run.close_code == 1000 and len(run.frames) == run.sent  # not a frame lost
        assert not run.of_type(Error)
        assert re.search(r"vad\[\d+\] killed by SIGKILL", server.log())
        wait_until("a new VAD process", lambda: server.child_pid("vad") not in (None, pid))
        resumed = [m for t, m in run.controls if isinstance(m, Vad) and t > killed_at + 1.0]
        assert resumed, "no speech events after the VAD came back"


def test_an_inference_crash_ends_only_its_sessions_and_the_server_comes_back() -> None:
    with ServerProcess(*LOOPBACK) as server:
        pid = server.child_pid("inference")

        async def scenario() -> ClientRun:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(10),
                                                       first_audio=streaming, end_session=False))
            await streaming.wait()
            os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(client, 20)

        run = asyncio.run(scenario())
        assert run.of_type(Error)[-1].code == ErrorCode.INTERNAL and run.close_code == 1011
        assert not run.of_type(SessionEnd)  # a failure, not a planned stop
        assert re.search(r"inference\[\d+\] killed by SIGKILL", server.log())
        wait_until("ready again", lambda: server.health()[0] == 200, 30)
        after = asyncio.run(stream_client(server.ws_url, telugu_speech_for(2), **ALL_BACK))
        assert len(after.frames) == after.sent


def test_a_network_crash_is_restarted_on_the_same_port() -> None:
    with ServerProcess(*LOOPBACK) as server:
        # Slot 0's first session
        before = asyncio.run(stream_client(server.ws_url, telugu_speech_for(1), **ALL_BACK))
        assert len(before.frames) == before.sent
        pid = server.child_pid("network")
        os.kill(pid, signal.SIGKILL)
        wait_until("restarted", lambda: server.child_pid("network") not in (None, pid))
        wait_until("serving again", lambda: server.health()[0] == 200, 30)
        # Slot 0's first, again
        run = asyncio.run(stream_client(server.ws_url, telugu_speech_for(2), **ALL_BACK))
        assert len(run.frames) == run.sent and run.close_code == 1000


def test_a_crash_loop_stops_the_server_with_exit_status_1() -> None:
    server = ServerProcess(*LOOPBACK)
    try:
        for _ in range(5):
            pid = server.child_pid("vad")
            os.kill(pid, signal.SIGKILL)
            wait_until("replaced or stopped",
                       lambda pid=pid: server.child_pid("vad") not in (None, pid)
                       or server.proc.poll() is not None)
        assert server.proc.wait(BOUND_S) == 1
        assert "crashes within 60 s: stopping" in server.log()
        assert not wait_gone(server.children, timeout=5)
        assert not list(SHM.glob(f"vring-{server.proc.pid}-*"))
    finally:
        server.__exit__(None, None, None)


def test_the_resource_trackers_death_is_noticed_and_cleanup_still_happens() -> None:
    server = ServerProcess(*LOOPBACK)
    try:
        tracker = next(p for p in server.children
                       if "resource_tracker" in Path(f"/proc/{p}/cmdline").read_text())
        os.kill(tracker, signal.SIGKILL)
        wait_until("noticed", lambda: "the resource tracker" in server.log())
        assert list(SHM.glob(f"vring-{server.proc.pid}-*"))
        server.proc.kill()  # the supervisor dies outright: only the new tracker can clean up
        server.proc.wait()
        wait_until("segments unlinked", lambda: not list(SHM.glob(f"vring-{server.proc.pid}-*")))
    finally:
        server.__exit__(None, None, None)


# ---- stop and drain ----------------------------------------------------------------------------------------


def test_a_client_that_does_not_read_cannot_hold_up_a_stop() -> None:
    server = ServerProcess(*LOOPBACK, "--max-sessions", "4")
    try:

        async def stalled() -> None:
            with contextlib.suppress(ConnectionClosed, OSError):
                async with connect(server.ws_url, max_queue=2) as ws:
                    sock = ws.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    ws.transport.pause_reading()
                    for _ in range(2000):
                        await ws.send(FRAME)
                        await asyncio.sleep(0.02)  # pacing, as a microphone

        async def scenario() -> tuple[list[ClientRun], tuple[int, float]]:
            streaming = [asyncio.Event() for _ in range(3)]
            normal = [asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(30),
                                                        first_audio=e, end_session=False)) for e in streaming]
            stuck = asyncio.create_task(stalled())
            await asyncio.gather(*(e.wait() for e in streaming))
            host, port = server.url.removeprefix("http://").rsplit(":", 1)
            handshaking = socket.create_connection((host, int(port)))  # connected, no request sent yet
            await asyncio.sleep(2)  # the stalled client's buffers fill; a duration, not synchronisation
            stopped = await asyncio.to_thread(server.stop, signal.SIGINT)
            runs = await asyncio.gather(*normal)
            stuck.cancel()
            handshaking.close()
            return list(runs), stopped

        runs, (code, took) = asyncio.run(scenario())
        assert code == 0, server.log()
        assert took < 10
        for run in runs:
            assert run.of_type(SessionEnd)[-1].reason == "server_shutdown" and run.close_code == 1001
        assert "could not take its goodbye" in server.log()
    finally:
        server.__exit__(None, None, None)


def test_sigterm_drains_live_sessions_finish_and_a_second_sigterm_stops_at_once() -> None:
    server = ServerProcess(*LOOPBACK, "--drain-timeout", "20")
    try:
        # A session already over
        earlier = asyncio.run(stream_client(server.ws_url, telugu_speech_for(1), **ALL_BACK))
        assert earlier.close_code == 1000

        async def scenario() -> tuple[ClientRun, int, int]:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(4),
                                                       first_audio=streaming, **ALL_BACK))
            await streaming.wait()
            server.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            while server.health()[1].get("status") != "draining":
                assert time.monotonic() - t0 < 2, "not draining at once"
                await asyncio.sleep(0.02)  # polls /health
            try:
                async with connect(server.ws_url):
                    refused = 101
            except InvalidStatus as e:
                refused = e.response.status_code
            run = await client  # the live conversation finishes
            code = await asyncio.to_thread(server.proc.wait, BOUND_S)
            return run, refused, code

        run, refused, code = asyncio.run(scenario())
        assert refused == 503 and code == 0
        assert run.of_type(Draining) and run.of_type(Draining)[0].deadline_s == 20
        assert len(run.frames) == run.sent  # the drain cost the conversation nothing
        assert run.of_type(SessionEnd)[-1].reason == "client_request"
    finally:
        server.__exit__(None, None, None)

    server = ServerProcess(*LOOPBACK, "--drain-timeout", "60")
    try:

        async def twice() -> tuple[ClientRun, tuple[int, float]]:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(30),
                                                       first_audio=streaming, end_session=False))
            await streaming.wait()
            server.proc.send_signal(signal.SIGTERM)
            wait = await asyncio.to_thread(wait_until, "draining",
                                           lambda: server.health()[1].get("status") == "draining")
            assert wait < 2
            stopped = await asyncio.to_thread(server.stop, signal.SIGTERM)
            return await client, stopped

        run, (code, took) = asyncio.run(twice())
        assert code == 0 and took < 8
        assert run.of_type(SessionEnd)[-1].reason == "server_shutdown" and run.close_code == 1001
    finally:
        server.__exit__(None, None, None)


# ---- the open-files limit ---------------------------------------------------------------------------------


def test_a_limit_that_cannot_hold_max_sessions_refuses_to_start_and_says_why() -> None:
    def low_hard_limit() -> None:  # in the child: the soft limit cannot be raised past 512
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))

    proc = subprocess.run([sys.executable, "-m", "supervisor", "--host", "127.0.0.1", "--port", "0",
                           *LOOPBACK, "--max-sessions", "256"], preexec_fn=low_hard_limit,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "open-files limit (512" in proc.stderr and "--max-sessions 256 needs" in proc.stderr
    assert "READY" not in proc.stdout


def test_near_the_open_files_limit_newcomers_get_capacity_and_health_still_answers() -> None:
    with ServerProcess(*LOOPBACK, "--max-sessions", "8") as server:
        network = server.child_pid("network")
        assert network is not None
        open_now = len(os.listdir(f"/proc/{network}/fd"))
        # Room for two sessions' sockets above the reserve; none for a third.
        limit = open_now + 2 + RESERVE_FDS
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.prlimit(network, resource.RLIMIT_NOFILE, (limit, hard))

        async def scenario() -> tuple[list[object], int | None]:
            async with connect(server.ws_url) as a, connect(server.ws_url) as b:
                for ws in (a, b):
                    assert isinstance(decode_server(await ws.recv()), SessionStart)
                async with connect(server.ws_url) as c:
                    got = await messages_until_closed(c)
                    return got, c.close_code

        got, code = asyncio.run(scenario())
        assert isinstance(got[0], Error) and got[0].code == ErrorCode.CAPACITY and code == 1013, got
        status, body = server.health()
        assert status == 200 and body["status"] == "ok"  # it answers; and with the two gone, it takes more
        run = asyncio.run(stream_client(server.ws_url, telugu_speech_for(1), **ALL_BACK))
        assert run.close_code == 1000 and len(run.frames) == run.sent
