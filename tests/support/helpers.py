"""Assertions and waits on a running server that several tests and benchmarks make."""

from __future__ import annotations

import time

from procs.client import ClientRun
from protocol import FRAME_MS, SessionEnd
from tests.support.launcher import ServerProcess

FRAME_S = FRAME_MS / 1000  # one wire frame, in seconds: the real-time pace of a client


def assert_real_time(run: ClientRun) -> None:
    """Audio came back at >= 90% of the real-time rate (one frame per FRAME_S) until the client stopped
    sending or the server ended the session, in frames that all decoded."""
    assert run.session_start is not None
    assert not run.bad_frames, f"{len(run.bad_frames)} output frames that did not decode"
    assert run.frames, "no audio came back"
    ends = [t for t, m in run.controls if isinstance(m, SessionEnd)]
    until = run.t_last_send or ends[0]
    due = (until - run.frames[0][0]) / FRAME_S
    got = sum(1 for t, _ in run.frames if t <= until)
    assert got >= 0.9 * due, f"{got} frames back while {due:.0f} were due"


def wait_for_sessions(server: ServerProcess, active: int, timeout_s: float = 5.0) -> None:
    """Bounded wait until /health reports `active` sessions (a slot is released after the close)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = server.health()
        assert status in (200, 503), status
        if (seen := body["sessions_active"]) == active:
            return
        assert time.monotonic() < deadline, f"sessions_active stayed {seen}, expected {active}"
        time.sleep(0.02)  # polls /health; the deadline is the bound


def metric(server: ServerProcess, name: str) -> float:
    """One sample of the server's /metrics, by its name with labels (`voice_x{reason="y"}`), which must be
    there."""
    value = server.metric(name)
    assert value is not None, f"/metrics has no {name}"
    return value
