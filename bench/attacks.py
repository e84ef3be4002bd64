"""The attacks of the hardening issue, each run once against a real server on loopback, with what the server
did: the figures behind the reliability table in bench/RESULTS.md.

    python -m bench.attacks --json attacks.json            # every attack (about 3 minutes)
    python -m bench.attacks idle flood                      # some of them

Bounded in count and time, loopback only; the loopback engine (each session hears itself), so a frame's
latency is its round trip through the server. tests/test_hardening.py asserts the same behaviours.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from procs.client import ClientRun, messages_until_closed, stream_client
from protocol import IN_FRAME_BYTES, Error, SessionEnd, encode_client_audio
from tests.support.launcher import SHM, ServerProcess, poll_until
from tests.support.speech import telugu_speech_for

LOOPBACK = ("--engine", "loopback")
FRAME = encode_client_audio(bytes(IN_FRAME_BYTES))
Figures = dict[str, Any]


def health(server: ServerProcess) -> tuple[int, str]:
    code, body = server.health()
    return code, body.get("status", "unreachable")


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


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


ATTACKS: dict[str, Callable[[], Figures]] = {
    "idle": idle, "strangers": strangers, "stop_reading": stop_reading, "flood": flood,
    "protocol": protocol_edges, "hung": hung_inference, "crashes": crashes, "slow_stop": slow_client_stop,
    "drain": drain,
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
