"""Run the server (`python -m supervisor`) as a child process and wait until it is ready.

For the tests, the benchmarks and the GPU check: it starts the real supervisor with its three processes on
a free port and reads the `READY <url>` line the supervisor prints once sessions can start.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ringbuf.procinfo import child_pids, pid_running

SHM = Path("/dev/shm")


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
    return [pid for pid in pids if pid_running(pid)]


class ServerProcess:
    """`python -m supervisor --host 127.0.0.1 --port 0 ...`, ready once it prints its READY line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0,
                 cwd: Path | None = None) -> None:
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log", delete=False)  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            env={**os.environ, **(env or {})},
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
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        self.log_file.close()
