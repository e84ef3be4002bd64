"""Process identity for peer-liveness checks: a pid plus its start time defeats pid reuse."""

from __future__ import annotations

import enum


class PeerState(enum.IntEnum):
    UNBOUND = 0  # no process has bound this side yet
    ALIVE = 1  # the bound process is running
    CLOSED = 2  # the bound process closed its side cleanly
    DEAD = 3  # the bound process exited (or was killed) without closing


def read_proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc/PID/stat, or None if no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            raw = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; everything after the LAST ')' is
    # space-separated: field 3 (state) is index 0 there and field 22 (starttime) is index 19.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def process_start_time(pid: int) -> int:
    """Start time of a running process (clock ticks since boot); raises ProcessLookupError if gone."""
    stat = read_proc_stat(pid)
    if stat is None:
        raise ProcessLookupError(pid)
    return stat[1]


def same_process_running(pid: int, start_time: int) -> bool:
    """True if `pid` is still the process that started at `start_time` and has not exited.

    A killed child that its parent has not reaped yet is a zombie ('Z'): its pid and start time are
    still there, but it is dead for our purposes.
    """
    stat = read_proc_stat(pid)
    return stat is not None and stat[1] == start_time and stat[0] not in ("Z", "X", "x")


def peer_state(pid: int, start_time: int, closed: int) -> PeerState:
    if pid == 0:
        return PeerState.UNBOUND
    if closed:
        return PeerState.CLOSED
    return PeerState.ALIVE if same_process_running(pid, start_time) else PeerState.DEAD
