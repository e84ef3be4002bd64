"""Run the server (`python -m procs.supervisor`) as a child process, wait until it is ready, watch its
processes.

For the tests, the benchmarks and the GPU check (not installed with the server): it starts the real
supervisor with its three processes on a free port and reads the `READY <url>` line the supervisor prints
once sessions can start; the helpers below find a server's processes and the CPU they use (from /proc,
through ringbuf.procinfo).
"""

from __future__ import annotations

import json
import os
import re
import select
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from procs.runtime import PROCESS_NAME_PREFIX
from ringbuf.procinfo import CLOCK_TICKS_PER_S, read_proc_stat

SHM = Path("/dev/shm")


def pid_running(pid: int) -> bool:
    stat = read_proc_stat(pid)
    return stat is not None and stat.running


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [child for child in pids if (stat := read_proc_stat(child)) is not None and stat.ppid == pid]


def process_tree(root: int) -> list[int]:
    """`root` and every descendant of it."""
    tree, frontier = [root], [root]
    while frontier:
        children = [c for p in frontier for c in child_pids(p)]
        tree += children
        frontier = children
    return tree


def comm(pid: int) -> str | None:
    """The process's name (/proc/PID/comm); None if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def role_pids(supervisor: int) -> dict[str, int]:
    """The supervisor's running children by role (network, inference, vad), from the names they give
    themselves (procs.runtime.process_name); the newest where a restarted child's predecessor lingers."""
    found: dict[str, tuple[int, int]] = {}
    for pid in child_pids(supervisor):
        name, stat = comm(pid), read_proc_stat(pid)
        if name is None or stat is None or not stat.running or not name.startswith(PROCESS_NAME_PREFIX):
            continue
        role = name.removeprefix(PROCESS_NAME_PREFIX)
        if role not in found or stat.start_time > found[role][0]:
            found[role] = (stat.start_time, pid)
    return {role: pid for role, (_, pid) in found.items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process; 0.0 if it is gone."""
    stat = read_proc_stat(pid)
    return 0.0 if stat is None else stat.cpu_s


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine spent busy (not idle, not iowait), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLOCK_TICKS_PER_S


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


def poll_until(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `condition()` held, or None if it did not within `timeout` (checked every 50 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return round(time.monotonic() - t0, 3)
        time.sleep(0.05)  # polls a condition; the timeout is the bound
    return None


class ServerProcess:
    """`python -m procs.supervisor --host 127.0.0.1 --port 0 ...`, ready once it prints its READY line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0,
                 cwd: Path | None = None) -> None:
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="server-", suffix=".log", delete=False)  # noqa: SIM115
        self.started = time.monotonic()
        self.agent_port: int | None = None  # the HAProxy agent check's port, from `agent=` on the READY line
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "procs.supervisor", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            # The server is configured by its arguments (and `env`) alone: a VOICE_* variable of the shell
            # that runs the tests would change every server they start.
            env={**{k: v for k, v in os.environ.items() if not k.startswith("VOICE_")}, **(env or {})},
        )
        self.url = self._wait_ready(ready_timeout)
        self.ready_s = time.monotonic() - self.started
        self.ws_url = self.url.replace("http", "ws", 1) + "/ws"  # http -> ws, https -> wss
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
            if line.startswith("READY "):  # READY <url> model=<name> [agent=<port>]
                fields = dict(word.split("=", 1) for word in line.split()[2:] if "=" in word)
                if "agent" in fields:
                    self.agent_port = int(fields["agent"])
                return line.split()[1]
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"server not ready within {timeout:.0f} s; log:\n{self.log()}")

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return Path(self.log_file.name).read_text()

    def health(self) -> tuple[int, dict]:
        """GET /health: (HTTP status, its JSON body); (0, {}) when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError:
            return 0, {}

    @property
    def port(self) -> int:
        """The port it listens on (it was started with --port 0)."""
        return int(self.url.rsplit(":", 1)[1])

    def metric(self, name: str) -> float | None:
        """One sample of GET /metrics, by its name as exposed, labels included
        (`voice_resume_failures_total{reason="used"}`); None when the server exposes no such sample."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return None if found is None else float(found.group(1))

    def child_pid(self, role: str) -> int | None:
        """The pid of the running child of `role` (network, vad, inference), from /proc; None while there
        is none (it died and its successor has not started yet)."""
        return role_pids(self.proc.pid).get(role)

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
