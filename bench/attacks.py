"""The attacks of the hardening issue, each run once against a real server on loopback, with what the server
did: the figures behind the reliability table in bench/RESULTS.md.

    python -m bench.attacks --json attacks.json            # every attack (4 min 49 s on 2 loaded cores)
    python -m bench.attacks idle flood                      # some of them
    python -m bench.attacks resume_flood resume_race resume_takeover   # resume after a drop (issue 19)

Bounded in count and time, loopback only; the loopback engine (each session hears itself), so a frame's
latency is its round trip through the server. tests/test_hardening.py asserts the same behaviours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import string
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from procs.client import ClientRun, messages_until_closed, stream_client
from procs.network.resume import ResumeRefusal, TokenBook
from protocol import (
    CLOSE_RESUMED_ELSEWHERE,
    FRAMES_PER_BLOCK,
    IN_FRAME_BYTES,
    ClientSessionEnd,
    Error,
    ErrorCode,
    SessionEnd,
    SessionStart,
    decode_server,
    encode_client_audio,
    encode_client_control,
)
from tests.support.helpers import metric
from tests.support.launcher import SHM, ServerProcess, poll_until
from tests.support.proxy import TcpProxy
from tests.support.speech import telugu_speech_for

LOOPBACK = ("--engine", "loopback")
FRAME = encode_client_audio(bytes(IN_FRAME_BYTES))
Figures = dict[str, Any]


def health(server: ServerProcess) -> tuple[int, str]:
    code, body = server.health()
    return code, body.get("status", "unreachable")


def latencies_ms(run: ClientRun) -> list[float]:
    """Loopback: output frame i answers input frame i; its round trip in ms."""
    n = min(len(run.frames), run.sent)
    return [1000 * (run.frames[i][0] - run.send_times[i]) for i in range(n)]


async def handshake_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        async with connect(url, additional_headers=headers or {}):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


# ---- the attacks -----------------------------------------------------------------------------------------


def idle() -> Figures:
    """Four clients complete the handshake and send nothing, with --max-sessions 4 and the default timeout."""
    with ServerProcess(*LOOPBACK, "--max-sessions", "4") as server:

        async def one() -> tuple[float, str, int | None]:
            t0 = time.monotonic()
            async with connect(server.ws_url) as ws:
                got = await asyncio.wait_for(messages_until_closed(ws), 60)
                codes = [m.code.value for m in got if isinstance(m, Error)]
                return time.monotonic() - t0, ",".join(codes), ws.close_code

        async def scenario() -> list[tuple[float, str, int | None]]:
            return list(await asyncio.gather(*(one() for _ in range(4))))

        results = asyncio.run(scenario())
        freed = poll_until(lambda: health(server)[0] == 200, 10)
        newcomer = asyncio.run(handshake_status(server.ws_url))
    return {"idle sessions closed after (s)": round(max(r[0] for r in results), 1),
            "their error / close": f"{results[0][1]} / {results[0][2]}",
            "/health 200 again after close (s)": freed, "newcomer handshake": newcomer}


def strangers() -> Figures:
    token = "operator-token-0123456789"
    with ServerProcess(*LOOPBACK) as server:
        evil = asyncio.run(handshake_status(server.ws_url, {"Origin": "https://evil.example"}))
        null = asyncio.run(handshake_status(server.ws_url, {"Origin": "null"}))
    with ServerProcess(*LOOPBACK, "--auth-token", token, "--log-level", "DEBUG") as server:
        none = asyncio.run(handshake_status(server.ws_url))
        wrong = asyncio.run(handshake_status(server.ws_url + "?token=not-the-token-0123456"))
        right = asyncio.run(handshake_status(server.ws_url + "?token=" + token))
        logged = token in server.log()
    return {"Origin evil.example": evil, "Origin null": null, "no token": none, "wrong token": wrong,
            "right token": right, "token in the log": logged}


def stop_reading() -> Figures:
    """A client stops reading for 10 s (its kernel's default buffers) and resumes."""
    with ServerProcess(*LOOPBACK) as server:

        async def scenario() -> tuple[list[float], int]:
            async with connect(server.ws_url, max_queue=4) as ws:
                await ws.recv()
                loop = asyncio.get_running_loop()
                sends: list[float] = []
                t0 = loop.time()
                ws.transport.pause_reading()
                for i in range(500):  # 10 s; frame i is the constant 10 x (i + 1), which loopback returns
                    await asyncio.sleep(max(0.0, t0 + i * 0.02 - loop.time()))  # pacing, as a microphone
                    await ws.send(encode_client_audio(np.full(IN_FRAME_BYTES // 2, 10 * (i + 1), np.int16)
                                                      .tobytes()))
                    sends.append(loop.time())
                ws.transport.resume_reading()
                late = []
                with contextlib.suppress(TimeoutError):
                    while True:  # what waited for the client, until the stream is back to real time
                        message = await asyncio.wait_for(ws.recv(), 0.015)
                        if isinstance(message, bytes):
                            index = round(float(np.median(np.frombuffer(message[1:], np.int16))) / 10) - 1
                            if 0 <= index < len(sends):
                                late.append(loop.time() - sends[index])
                return late, len(sends)

        late, sent = asyncio.run(scenario())
        dropped = metric(server, "voice_output_frames_dropped_total")
    return {"frames sent while not reading": sent, "frames that waited, delivered on resume": len(late),
            "of them more than 1 s late": sum(t > 1.0 for t in late),
            "most late (s)": round(max(late, default=0.0), 2),
            "output frames dropped (counted)": int(dropped)}


def warning_records(json_log: str) -> int:
    """Records at WARNING in a `--log-format json` log (one JSON object a line)."""
    return sum(1 for line in json_log.splitlines()
               if line.startswith("{") and json.loads(line).get("level") == "WARNING")


def flood() -> Figures:
    """A neighbour streams at real time; another client sends as fast as it can."""
    with ServerProcess(*LOOPBACK, "--max-sessions", "2", "--log-format", "json") as server:
        alone = asyncio.run(stream_client(server.ws_url, telugu_speech_for(4), tail_s=0.5))

        async def flooder() -> tuple[int, int, int | None]:
            sent = 0
            async with connect(server.ws_url) as ws:
                reader = asyncio.create_task(messages_until_closed(ws))
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(5000):
                        await ws.send(FRAME)
                        sent += 1
                got = await asyncio.wait_for(reader, 15)
                return sent, sum(isinstance(m, Error) for m in got), ws.close_code

        async def scenario() -> tuple[ClientRun, tuple[int, int, int | None]]:
            neighbour = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(4), tail_s=0.5))
            await asyncio.sleep(0.5)  # a start offset
            flooded = await flooder()
            return await neighbour, flooded

        lines_before = warning_records(server.log())
        neighbour, (sent, errors, code) = asyncio.run(scenario())
        warnings = warning_records(server.log()) - lines_before
        refused = metric(server, "voice_input_frames_rate_limited_total")
    return {"neighbour median latency alone (ms)": round(statistics.median(latencies_ms(alone)), 1),
            "neighbour median latency with flood (ms)": round(statistics.median(latencies_ms(neighbour)), 1),
            "neighbour frames lost": neighbour.sent - len(neighbour.frames),
            "flood: frames sent before close": sent, "flood: refused (counted)": int(refused),
            "flood: rate_limited errors": errors, "flood: close code": code, "WARNING lines": warnings}


def protocol_edges() -> Figures:
    with ServerProcess(*LOOPBACK) as server:

        async def send_then_close(raw: str | bytes) -> tuple[int | None, list[str], str]:
            async with connect(server.ws_url, max_size=None) as ws:
                await ws.recv()
                await ws.send(raw, text=True)  # bytes as a text frame: not UTF-8
                got = await asyncio.wait_for(messages_until_closed(ws), 15)
                errors = [m.code.value for m in got if isinstance(m, Error)]
                return ws.close_code, errors, ws.close_reason or ""

        big_code, big_errors, big_reason = asyncio.run(send_then_close("x" * 70_000))
        bad_code, bad_errors, bad_reason = asyncio.run(send_then_close(b'{"type": "ping\xff"}'))
        reasons = [big_reason, bad_reason]  # the close frames' reasons: what the client was told
        req = urllib.request.Request(server.url + "/health", method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
            post = 200
        except urllib.error.HTTPError as e:
            post = e.code
        head = urllib.request.Request(server.url + "/", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as r:
            head_body = len(r.read())
    return {"70 kB text: close code": big_code, "its errors": big_errors,
            "non-UTF-8 text: close code": bad_code, "its errors ": bad_errors, "close reasons": reasons,
            "POST /health": post, "HEAD / body bytes": head_body}


def hung_inference() -> Figures:
    """Two sessions streaming, then SIGSTOP of the inference process."""
    with ServerProcess(*LOOPBACK) as server:
        pid = server.child_pid("inference")

        async def scenario() -> tuple[list[ClientRun], float, list[str]]:
            streaming = [asyncio.Event(), asyncio.Event()]
            clients = [asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(30), first_audio=e,
                                                         end_session=False)) for e in streaming]
            await asyncio.gather(*(e.wait() for e in streaming))
            os.kill(pid, signal.SIGSTOP)
            t0 = asyncio.get_running_loop().time()
            polls = []
            for _ in range(8):
                polls.append(str((await asyncio.to_thread(health, server))[0]))
                await asyncio.sleep(1)  # one /health poll a second, as a balancer
            runs = await asyncio.gather(*clients)
            return list(runs), t0, polls

        runs, stopped_at, polls = asyncio.run(scenario())
        told = [round(next(t for t, m in r.controls if isinstance(m, Error)) - stopped_at, 1) for r in runs]
        back = poll_until(lambda: health(server)[0] == 200, 60)
    return {"/health during 8 s (1 poll/s)": " ".join(polls), "sessions told internal after (s)": told,
            "close codes": [r.close_code for r in runs], "healthy again after (s)": back}


def crashes() -> Figures:
    out: Figures = {}
    with ServerProcess(*LOOPBACK) as server:
        for role in ("vad", "inference", "network"):

            async def scenario(role: str = role) -> ClientRun:
                streaming = asyncio.Event()
                client = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(8),
                                                           first_audio=streaming, tail_s=0.5,
                                                           end_session=role == "vad"))
                await streaming.wait()
                os.kill(server.child_pid(role), signal.SIGKILL)
                return await asyncio.wait_for(client, 30)

            killed = server.child_pid(role)
            run = asyncio.run(scenario())
            back = poll_until(lambda: health(server)[0] == 200, 60)
            errors = [m.code.value for m in run.of_type(Error)]
            lost = run.sent - len(run.frames)
            out[f"{role} SIGKILL: live session"] = f"close {run.close_code}, {lost} lost, errors {errors}"
            out[f"{role} SIGKILL: serving again after (s)"] = back
            out[f"{role} SIGKILL: replaced by a new process"] = server.child_pid(role) not in (None, killed)
        shm = len(list(SHM.glob(f"vring-{server.proc.pid}-*")))
    out["segments during / after stop"] = f"{shm} / {len(list(SHM.glob(f'vring-{server.proc.pid}-*')))}"
    return out


def slow_client_stop() -> Figures:
    """One client streaming and not reading, three normal ones, then a stop at once (SIGINT); three runs."""
    results = []
    for _ in range(3):
        server = ServerProcess(*LOOPBACK, "--max-sessions", "4")
        try:

            async def stalled(server: ServerProcess = server) -> None:
                with contextlib.suppress(ConnectionClosed, OSError):
                    async with connect(server.ws_url, max_queue=2) as ws:
                        ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                                         4096)
                        ws.transport.pause_reading()
                        for _ in range(2000):
                            await ws.send(FRAME)
                            await asyncio.sleep(0.02)  # pacing, as a microphone

            async def scenario(server: ServerProcess = server) -> tuple[list[ClientRun], tuple[int, float]]:
                streaming = [asyncio.Event() for _ in range(3)]
                normal = [asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(30),
                                                            first_audio=e, end_session=False))
                          for e in streaming]
                stuck = asyncio.create_task(stalled())
                await asyncio.gather(*(e.wait() for e in streaming))
                await asyncio.sleep(2)  # the stalled client's buffers fill
                stopped = await asyncio.to_thread(server.stop, signal.SIGINT)
                runs = await asyncio.gather(*normal)
                stuck.cancel()
                return list(runs), stopped

            runs, (code, took) = asyncio.run(scenario())
            goodbyes = sum(bool(r.of_type(SessionEnd)) and r.close_code == 1001 for r in runs)
            results.append(f"exit {code} in {took:.1f} s, {goodbyes}/3 session_end+1001")
        finally:
            server.__exit__(None, None, None)
    return {f"run {i + 1}": r for i, r in enumerate(results)}


def drain() -> Figures:
    server = ServerProcess(*LOOPBACK, "--drain-timeout", "30")
    try:

        async def scenario() -> tuple[ClientRun, float | None, int, tuple[int, float]]:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(server.ws_url, telugu_speech_for(6),
                                                       first_audio=streaming, tail_s=0.3))
            await streaming.wait()
            server.proc.send_signal(signal.SIGTERM)
            draining = await asyncio.to_thread(poll_until, lambda: health(server)[1] == "draining", 5)
            newcomer = await handshake_status(server.ws_url)
            run = await client
            t0 = time.monotonic()
            code = await asyncio.to_thread(server.proc.wait, 30)
            return run, draining, newcomer, (code, time.monotonic() - t0)

        run, draining, newcomer, (code, after) = asyncio.run(scenario())
    finally:
        server.__exit__(None, None, None)
    return {"/health draining after SIGTERM (s)": draining, "newcomer during drain": newcomer,
            "live session: frames lost": run.sent - len(run.frames),
            "live session told": [type(m).__name__ for _, m in run.controls][-3:],
            "exit code": code, "exit after the last session ended (s)": round(after, 2)}


# ---- resume after a dropped link (issue 19) ---------------------------------------------------------------

SETTLE_S = 15.0  # after an attack: how long the server gets to give every slot back
URLSAFE = string.ascii_letters + string.digits + "-_"  # a resume token's alphabet


def refusals(server: ServerProcess) -> Counter[str]:
    """`voice_resume_failures_total` by reason."""
    return Counter({r.value: int(metric(server, f'voice_resume_failures_total{{reason="{r.value}"}}'))
                    for r in ResumeRefusal})


def counted(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {reason: after[reason] - before[reason] for reason in after if after[reason] != before[reason]}


def leftovers(server: ServerProcess) -> Figures:
    """What an attack left behind: every slot back (within SETTLE_S), nothing detached."""
    back = poll_until(lambda: server.health()[1].get("sessions_active") == 0, SETTLE_S)
    return {"after: sessions_active back to 0 in (s)": back,
            "after: sessions_active": server.health()[1].get("sessions_active"),
            "after: voice_sessions_detached": int(metric(server, "voice_sessions_detached"))}


async def opening(url: str, n: int, timeout_s: float = 10.0) -> tuple[list[object], Any]:
    """The first `n` messages of a new connection to `url` (decoded), and the connection, still open."""
    ws = await connect(url, compression=None)
    got = [decode_server(await asyncio.wait_for(ws.recv(), timeout_s)) for _ in range(n)]
    return got, ws


async def detach_through(proxy: TcpProxy, ws: Any, server: ServerProcess) -> float | None:
    """Send a frame on `ws` and, once the server has heard it (a session that never heard a frame is not
    kept for a resume; nothing else may stream meanwhile), cut `proxy`'s links (RST both ways, no close)
    and restore it; seconds until the server says its session is detached (None: not within 5 s)."""
    heard = metric(server, "voice_frames_in_total")
    await ws.send(FRAME)
    await asyncio.to_thread(poll_until, lambda: metric(server, "voice_frames_in_total") > heard, 5.0)
    await asyncio.to_thread(proxy.cut)
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        await asyncio.wait_for(ws.recv(), 5)  # the client's side of the cut
    await asyncio.to_thread(proxy.restore)
    return await asyncio.to_thread(poll_until, lambda: metric(server, "voice_sessions_detached") >= 1, 5.0)


async def echo_blocks(ws: Any, blocks: int) -> tuple[int, int, list[str], int | None]:
    """Stream `blocks` 80 ms blocks of silence at real-time pace on an open `/ws` connection, then end the
    session: (frames sent, audio frames back, error codes, close code). Loopback returns a frame for each."""
    back, errors = 0, []

    async def reader() -> None:
        nonlocal back
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                decoded = decode_server(message)
                if isinstance(decoded, memoryview):
                    back += 1
                elif isinstance(decoded, Error):
                    errors.append(decoded.code.value)

    task = asyncio.create_task(reader())
    loop = asyncio.get_running_loop()
    t0, sent = loop.time(), blocks * FRAMES_PER_BLOCK
    for i in range(sent):
        await asyncio.sleep(max(0.0, t0 + i * 0.02 - loop.time()))  # pacing, as a microphone
        await ws.send(FRAME)
    deadline = loop.time() + 3.0
    while back < sent and loop.time() < deadline:
        await asyncio.sleep(0.01)  # the last block's echo; the deadline bounds it
    with contextlib.suppress(ConnectionClosed):
        await ws.send(encode_client_control(ClientSessionEnd()))
    await asyncio.wait_for(task, 10)
    return sent, back, errors, ws.close_code


@dataclass
class Attempt:
    """What one resume attempt with a bad token got as its first two messages."""

    kind: str
    resumed: bool  # its session_start said resumed (it must never)
    someones: bool  # it named the victim's or the sentinel's session (it must never)
    told: bool  # a fresh session_start, then error resume_failed (not fatal)


def resume_flood() -> Figures:
    """While a victim streams, 4 attackers at once present 1,000 resume tokens that cannot be right: random
    ones, the victim's live token and a detached sentinel's with one character changed, a spent token, an
    expired one, another server's, malformed ones. Then the sentinel is resumed with its real token."""
    attempts, attackers = 1000, 4
    pcm = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 330) * 8000).astype(np.int16)
    with (ServerProcess(*LOOPBACK, "--max-sessions", "16", "--resume-window", "120") as server,
          TcpProxy("127.0.0.1", server.port) as proxy):
        before, sessions_before = refusals(server), metric(server, "voice_sessions_total")

        async def spent_and_expired() -> tuple[str, str]:
            (start,), ws = await opening(server.ws_url, 1)
            assert isinstance(start, SessionStart) and start.resume_token
            (again,), ws2 = await opening(f"{server.ws_url}?resume={start.resume_token}", 1)
            assert isinstance(again, SessionStart) and again.resume_token
            await ws.wait_closed()
            await ws2.send(encode_client_control(ClientSessionEnd()))
            await ws2.wait_closed()
            return start.resume_token, again.resume_token  # spent by the resume; expired with the session

        def one_changed(token: str, rng: np.random.Generator) -> str:
            at = int(rng.integers(len(token)))
            char = token[at]
            while char == token[at]:
                char = URLSAFE[int(rng.integers(len(URLSAFE)))]
            return token[:at] + char + token[at + 1:]

        async def scenario() -> tuple[ClientRun, list[Attempt], float, object, float]:
            used, expired = await spent_and_expired()
            foreign = TokenBook().issue((0, 1))
            (sentinel,), sentinel_ws = await opening(proxy.url(), 1)
            assert isinstance(sentinel, SessionStart) and sentinel.resume_token
            await detach_through(proxy, sentinel_ws, server)
            done, run = asyncio.Event(), ClientRun()
            # It listens 2 s after its last frame before it ends its session: with a looped file,
            # `until_frames` counts the file's frames, not those sent, so it would not wait for its last
            # block's echo (a session ended by its client drops the block it has not been answered yet).
            victim = asyncio.create_task(stream_client(server.ws_url, pcm, repeat_until=done, run=run,
                                                       tail_s=2.0))
            while run.session_start is None or len(run.frames) < 25:
                await asyncio.sleep(0.01)  # until the victim streams; wait_for bounds the scenario
            live = run.session_start.resume_token
            assert live and sentinel.resume_token
            ids = {run.session_start.session_id, sentinel.session_id}
            rng = np.random.default_rng(19)
            malformed = ["", "x" * 200, "%00", live + "=", live[:-1], f"{live}&resume={live}"]
            makers: list[tuple[str, Callable[[], str]]] = [
                ("random", lambda: secrets.token_urlsafe(32)),
                ("victim's, 1 char changed", lambda: one_changed(live, rng)),
                ("sentinel's, 1 char changed", lambda: one_changed(sentinel.resume_token or "", rng)),
                ("used", lambda: used), ("expired", lambda: expired), ("foreign", lambda: foreign),
                ("malformed", lambda: malformed[int(rng.integers(len(malformed)))]),
            ]
            queue = [makers[i % len(makers)] for i in range(attempts)]
            seen: list[Attempt] = []

            async def attacker() -> None:
                while queue:
                    kind, make = queue.pop()
                    try:
                        (start, error), ws = await opening(f"{server.ws_url}?resume={make()}", 2)
                    except (ConnectionClosed, TimeoutError):  # refused (capacity?): counted as not told
                        seen.append(Attempt(kind, False, False, False))
                        continue
                    seen.append(Attempt(
                        kind, isinstance(start, SessionStart) and start.resumed,
                        isinstance(start, SessionStart) and start.session_id in ids,
                        isinstance(start, SessionStart) and not start.resumed and isinstance(error, Error)
                        and error.code is ErrorCode.RESUME_FAILED and not error.fatal))
                    await ws.close()

            t0 = time.monotonic()
            await asyncio.gather(*(attacker() for _ in range(attackers)))
            took = time.monotonic() - t0
            done.set()
            await victim
            (back,), ws = await opening(f"{server.ws_url}?resume={sentinel.resume_token}", 1)
            await ws.send(encode_client_control(ClientSessionEnd()))
            await ws.wait_closed()
            return run, seen, took, back, sentinel.session_id

        run, seen, took, back, sentinel_id = asyncio.run(asyncio.wait_for(scenario(), timeout=240))
        left = leftovers(server)
        after = refusals(server)
        fresh = int(metric(server, "voice_sessions_total") - sessions_before)
        out: Figures = {"attempts (4 at once)": len(seen), "took (s)": round(took, 1),
                        "attempts by kind": dict(Counter(a.kind for a in seen)),
                        "resumed a session": sum(a.resumed for a in seen),
                        "got the victim's or the sentinel's session": sum(a.someones for a in seen),
                        "fresh session + resume_failed (not fatal)": sum(a.told for a in seen),
                        "refusals counted, by reason": counted(before, after),
                        "sessions opened (attempts + 3: victim, sentinel, the used token's)": fresh}
    whole = run.sent - run.sent % FRAMES_PER_BLOCK
    out.update({
        "victim: frames back / whole blocks sent": f"{len(run.frames)} / {whole}",
        "victim: errors": [e.code.value for e in run.of_type(Error)],
        "victim: session_starts / close code": f"{len(run.session_starts)} / {run.close_code}",
        "victim: median block latency (ms)": round(statistics.median(run.block_latencies_ms()), 1),
        "sentinel resumed with its own token after the flood": isinstance(back, SessionStart)
        and back.resumed and back.session_id == sentinel_id,
    })
    return out | left


def resume_race() -> Figures:
    """Two connections present one session's token at the same moment, 20 times: every other time the
    session is detached (its link cut), otherwise still attached (a half-dead link the server has not seen
    drop). Both may resume it in turn (a token stays good until the client speaks on the link it resumed:
    procs/network/resume.py), the second taking it over from the first (4001), or the second may get a fresh
    session and resume_failed; never may both carry it."""
    rounds = 20
    with (ServerProcess(*LOOPBACK, "--max-sessions", "8") as server,
          TcpProxy("127.0.0.1", server.port) as proxy):
        before, resumed_before = refusals(server), metric(server, "voice_sessions_resumed_total")

        async def contender(url: str, session_id: str) -> tuple[str, Any]:
            """'won' (resumed `session_id`), 'told' (a fresh session, then resume_failed), 'taken over' (the
            other took the session before this one's session_start went out: closed 4001) or what it got."""
            ws = await connect(url, compression=None)
            try:
                start = decode_server(await asyncio.wait_for(ws.recv(), 10))
            except ConnectionClosed:
                taken = ws.close_code == CLOSE_RESUMED_ELSEWHERE
                return ("taken over" if taken else f"closed {ws.close_code}"), ws
            if isinstance(start, SessionStart) and start.resumed and start.session_id == session_id:
                return "won", ws
            error = decode_server(await asyncio.wait_for(ws.recv(), 10))
            if (isinstance(start, SessionStart) and start.session_id != session_id
                    and isinstance(error, Error) and error.code is ErrorCode.RESUME_FAILED):
                return "told", ws
            return f"{type(start).__name__}+{type(error).__name__}", ws

        async def one(detached: bool) -> tuple[list[str], int | None]:
            (start,), old = await opening(proxy.url(), 1)
            assert isinstance(start, SessionStart) and start.resume_token
            if detached:
                await detach_through(proxy, old, server)
            else:
                await old.send(FRAME)
            url = f"{server.ws_url}?resume={start.resume_token}"
            got = await asyncio.gather(contender(url, start.session_id), contender(url, start.session_id))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(old.wait_closed(), 10)
            outcomes = []
            for outcome, ws in got:
                if outcome == "won":  # ends the session if it carries it; one taken over was closed 4001
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(encode_client_control(ClientSessionEnd()))
                    with contextlib.suppress(ConnectionClosed, TimeoutError):
                        while True:
                            await asyncio.wait_for(ws.recv(), 10)
                    outcome = {1000: "carried", CLOSE_RESUMED_ELSEWHERE: "taken over"}.get(
                        ws.close_code or 0, f"won, closed {ws.close_code}")
                outcomes.append(outcome)
                await ws.close()
            return sorted(outcomes), None if detached else old.close_code

        async def scenario() -> list[tuple[list[str], int | None]]:
            return [await one(detached=k % 2 == 0) for k in range(rounds)]

        results = asyncio.run(asyncio.wait_for(scenario(), timeout=180))
        left = leftovers(server)
        resumed = int(metric(server, "voice_sessions_resumed_total") - resumed_before)
        out: Figures = {
            "rounds (detached / still attached)": f"{rounds - rounds // 2} / {rounds // 2}",
            "outcomes per round": dict(Counter(" + ".join(outcome) for outcome, _ in results)),
            "rounds with the session on exactly one connection at the end": sum(
                o.count("carried") == 1 for o, _ in results),
            "rounds with two connections carrying it": sum(o.count("carried") == 2 for o, _ in results),
            "resumed, then taken over by the other (4001)": sum(o.count("taken over") for o, _ in results),
            "losers told resume_failed with a fresh session": sum(o.count("told") for o, _ in results),
            "still-attached rounds: old connection's close code": dict(Counter(
                str(code) for (_, code), k in zip(results, range(rounds), strict=True) if k % 2)),
            "resumes counted": resumed, "refusals counted, by reason": counted(before, refusals(server)),
        }
    return out | left


def resume_takeover() -> Figures:
    """A session's connection is still open on the server when its client resumes it on a new one (the
    client saw its link die, the server did not), 10 times; every other time the old connection has stopped
    reading too, with its buffers full, as a dead path's are. The old connection must be closed (4001), the
    new one carry the same session on, no session be opened for it."""
    rounds = 10
    with ServerProcess(*LOOPBACK, "--max-sessions", "8") as server:
        before, sessions_before = refusals(server), metric(server, "voice_sessions_total")
        resumed_before = metric(server, "voice_sessions_resumed_total")

        async def one(stalled: bool) -> dict[str, Any]:
            (start,), old = await opening(server.ws_url, 1)
            assert isinstance(start, SessionStart) and start.resume_token
            loop = asyncio.get_running_loop()
            if stalled:  # not reading, a small receive buffer: the server's writes to it back up
                old.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                old.transport.pause_reading()
                for _ in range(100):  # 2 s of audio, whose echo fills the buffers at both ends
                    await old.send(FRAME)
                    await asyncio.sleep(0.02)  # pacing, as a microphone
            else:  # a block, and its echo read: what the new connection gets back is its own
                for _ in range(FRAMES_PER_BLOCK):
                    await old.send(FRAME)
                echoed = 0
                while echoed < FRAMES_PER_BLOCK:
                    echoed += isinstance(decode_server(await asyncio.wait_for(old.recv(), 5)), memoryview)
            t0 = loop.time()
            (resumed,), new = await opening(f"{server.ws_url}?resume={start.resume_token}", 1)
            resume_s = loop.time() - t0
            took_over = (isinstance(resumed, SessionStart) and resumed.resumed
                         and resumed.session_id == start.session_id)

            async def old_end() -> float:
                if stalled:  # the path stays dead past the server's goodbye (GOODBYE_S, 2 s), then reads
                    await asyncio.sleep(3.0)
                    old.transport.resume_reading()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(old.wait_closed(), 10)
                return loop.time() - t0

            (sent, back, errors, code), old_closed_s = await asyncio.gather(echo_blocks(new, 25), old_end())
            return {"stalled": stalled, "took over": took_over, "resume_s": resume_s,
                    "old close": old.close_code, "old closed after (s)": old_closed_s, "echo": (sent, back),
                    "errors": errors, "new close": code}

        async def scenario() -> list[dict[str, Any]]:
            return [await one(stalled=k % 2 == 1) for k in range(rounds)]

        results = asyncio.run(asyncio.wait_for(scenario(), timeout=180))
        left = leftovers(server)
        sessions = int(metric(server, "voice_sessions_total") - sessions_before)
        resumed = int(metric(server, "voice_sessions_resumed_total") - resumed_before)
        out: Figures = {}
        for stalled, label in ((False, "reading"), (True, "stalled")):
            rs = [r for r in results if r["stalled"] is stalled]
            out[f"{label} old connection: rounds / taken over (same session, resumed)"] = (
                f"{len(rs)} / {sum(r['took over'] for r in rs)}")
            out[f"{label}: old connection's close codes"] = dict(Counter(str(r["old close"]) for r in rs))
            out[f"{label}: resume's session_start within, max (s)"] = round(max(r["resume_s"] for r in rs), 3)
            if not stalled:  # a stalled one reads again only 3 s later: its close is seen then
                out[f"{label}: old connection closed after the resume, max (s)"] = round(
                    max(r["old closed after (s)"] for r in rs), 2)
            out[f"{label}: new connection frames back / sent (25 blocks each)"] = (
                f"{sum(r['echo'][1] for r in rs)} / {sum(r['echo'][0] for r in rs)}")
            out[f"{label}: new connection errors / close codes"] = (
                f"{sum(len(r['errors']) for r in rs)} / {dict(Counter(str(r['new close']) for r in rs))}")
        out.update({"sessions opened (one per round expected)": sessions, "resumes counted": resumed,
                    "refusals counted, by reason": counted(before, refusals(server))})
    return out | left


ATTACKS: dict[str, Callable[[], Figures]] = {
    "idle": idle, "strangers": strangers, "stop_reading": stop_reading, "flood": flood,
    "protocol": protocol_edges, "hung": hung_inference, "crashes": crashes, "slow_stop": slow_client_stop,
    "drain": drain, "resume_flood": resume_flood, "resume_race": resume_race,
    "resume_takeover": resume_takeover,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("attacks", nargs="*", choices=[[], *ATTACKS], default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results: dict[str, Figures] = {}
    for name in args.attacks or list(ATTACKS):
        t0 = time.monotonic()
        results[name] = ATTACKS[name]()
        print(f"## {name} ({time.monotonic() - t0:.0f} s)")
        for key, value in results[name].items():
            print(f"  {key}: {value}")
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
