"""What /proc says about a process: the one place that parses /proc/PID/stat.

The ring uses it for peer liveness (a pid plus its start time defeats pid reuse); tests/support/launcher.py
builds on it for a server's children and CPU time.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class PeerState(enum.IntEnum):
    UNBOUND = 0  # no process has bound this side yet
    ALIVE = 1  # the bound process is running
    CLOSED = 2  # the bound process closed its side cleanly
    DEAD = 3  # the bound process exited (or was killed) without closing


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of /proc/PID/stat we use (see proc(5))."""

    state: str  # R running, S sleeping, D disk, T stopped, Z zombie, X dead...
    ppid: int
    utime_ticks: int
    stime_ticks: int
    start_time: int  # clock ticks since boot

    @property
    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used."""
        return (self.utime_ticks + self.stime_ticks) / CLOCK_TICKS_PER_S

    @property
    def running(self) -> bool:
        """Not exited: a zombie (killed, not reaped yet) has a stat line but is dead for our purposes."""
        return self.state not in ("Z", "X", "x")


def read_proc_stat(pid: int) -> ProcStat | None:
    """The process's stat line, parsed; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            raw = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; everything after the LAST ')' is
    # space-separated: field 3 (state) is index 0 there, field 4 (ppid) index 1, fields 14 and 15 (utime,
    # stime) indices 11 and 12, field 22 (starttime) index 19.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        utime_ticks=int(fields[11]),
        stime_ticks=int(fields[12]),
        start_time=int(fields[19]),
    )


def process_start_time(pid: int) -> int:
    """Start time of a running process (clock ticks since boot); raises ProcessLookupError if gone."""
    stat = read_proc_stat(pid)
    if stat is None:
        raise ProcessLookupError(pid)
    return stat.start_time


def same_process_running(pid: int, start_time: int) -> bool:
    """True if `pid` is still the process that started at `start_time` and has not exited."""
    stat = read_proc_stat(pid)
    return stat is not None and stat.start_time == start_time and stat.running


def peer_state(pid: int, start_time: int, closed: int) -> PeerState:
    if pid == 0:
        return PeerState.UNBOUND
    if closed:
        return PeerState.CLOSED
    return PeerState.ALIVE if same_process_running(pid, start_time) else PeerState.DEAD
