"""Run the real server (`python supervisor.py`) as a subprocess, and talk to it as a browser would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from protocol import (
    IN_FRAME_SAMPLES,
    OUT_FRAME_BYTES,
    ClientSessionEnd,
    SessionStart,
    decode_server,
    encode_client_audio,
    encode_client_control,
)

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until none of `pids` runs; returns those still running."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)
    return [pid for pid in pids if pid_alive(pid)]


class ServerProcess:
    """`python supervisor.py --port 0 ...`, ready once it prints its READY line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0) -> None:
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log", delete=False)  # noqa: SIM115
        full_env = {**os.environ, **(env or {})}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "supervisor.py", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            env=full_env,
        )
        self.url = self._wait_ready(ready_timeout)
        self.ready_s = time.monotonic() - self.started
        self.ws_url = self.url.replace("http://", "ws://") + "/ws"
        self.children = child_pids(self.proc.pid)

    def _wait_ready(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = self.proc.stdout.readline()
            if not line:  # exited before it was ready
                break
            if line.startswith("READY "):
                return line.split()[1]
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"server not ready within {timeout:.0f} s; log:\n{self.log()}")

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return Path(self.log_file.name).read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, float]:
        """Signal the supervisor; returns (exit code, seconds it took)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - t0

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for pid in self.children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log_file.close()


@dataclass
class ClientRun:
    """What one client saw."""

    session_start: SessionStart | None = None
    frames: list[tuple[float, bytes]] = field(default_factory=list)  # (receive time, 960 PCM bytes)
    bad_frames: list[bytes] = field(default_factory=list)
    controls: list[tuple[float, object]] = field(default_factory=list)
    sent: int = 0
    t_first_send: float = 0.0
    t_last_send: float = 0.0
    close_code: int | None = None
    close_reason: str = ""

    def of_type(self, cls: type[T]) -> list[T]:
        """The control messages of one type, in the order they arrived."""
        return [m for _, m in self.controls if isinstance(m, cls)]

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(f for _, f in self.frames), dtype=np.int16)


async def stream_client(
    url: str,
    pcm16: np.ndarray,
    *,
    tail_s: float = 1.0,
    inject: dict[int, list[str | bytes]] | None = None,
    end_session: bool = True,
    first_audio: asyncio.Event | None = None,
) -> ClientRun:
    """Stream `pcm16` (16 kHz int16) as 20 ms frames at real-time pace, collecting everything the server
    sends; `inject` maps a frame index to raw messages to send right before that frame."""
    run = ClientRun()
    n_frames = len(pcm16) // IN_FRAME_SAMPLES
    loop = asyncio.get_running_loop()
    async with connect(url, compression=None, max_size=2**20) as ws:

        async def receive() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    t = loop.time()
                    decoded = decode_server(message)
                    if isinstance(decoded, memoryview):
                        if first_audio is not None:
                            first_audio.set()
                        (run.frames if len(decoded) == OUT_FRAME_BYTES else run.bad_frames).append(
                            (t, bytes(decoded))
                        )
                    else:
                        run.controls.append((t, decoded))
                        if isinstance(decoded, SessionStart):
                            run.session_start = decoded

        receiver = asyncio.create_task(receive())
        try:
            t0 = loop.time()
            run.t_first_send = t0
            for i in range(n_frames):
                # Pace: frame i leaves at t0 + i * 20 ms, as a microphone would deliver it.
                delay = t0 + i * 0.02 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                for raw in (inject or {}).get(i, []):
                    await ws.send(raw)
                await ws.send(
                    encode_client_audio(pcm16[i * IN_FRAME_SAMPLES : (i + 1) * IN_FRAME_SAMPLES].tobytes())
                )
                run.sent += 1
            run.t_last_send = loop.time()
            await asyncio.sleep(tail_s)  # let the answer to the last frames arrive
            if end_session:
                await ws.send(encode_client_control(ClientSessionEnd()))
            await asyncio.wait_for(receiver, timeout=10)
        except ConnectionClosed:
            pass
        finally:
            receiver.cancel()
        run.close_code, run.close_reason = ws.close_code, ws.close_reason or ""
    return run
