"""Doorbell: an eventfd owned by a consumer process that any number of producers ring on publish.

One doorbell serves many rings: every ring whose producer was bound with `bind_producer(bell)` rings
the same bell, so one waiter in the consumer process sleeps on one fd for all of them (see
`ringbuf.wait.wait_any`). The eventfd counts rings; `drain()` resets the count.

No lost wake-ups: the producer rings AFTER it publishes, and the consumer drains BEFORE each check of
its rings that follows a sleep (wait() drains as it returns). The eventfd write and read are
syscalls that take the eventfd's lock, so each acts as a full barrier. Either a ring happens before
the drain, and then the check after the drain sees the published counter; or it happens after it,
and then the count is non-zero and the next poll returns at once. (A count left over from messages
already read costs one spurious wake-up, never a lost one.) Producers always ring (~0.3 µs for
`os.eventfd_write` measured here): a "consumer is sleeping" flag to skip the syscall would need a
store->load fence on the consumer (store the flag, then load the counters), which x86 TSO does not
give and Python cannot emit.

Peer death: `watch_process(pid, start_time)` adds a pidfd (`os.pidfd_open`) to the poll set, so a
waiter wakes promptly when a watched producer process exits, even if it never rings again.

Passing to a spawned child: a Doorbell pickles its eventfd with `multiprocessing.reduction.DupFd`,
as multiprocessing's own Connection objects do. Pass it as a `Process(args=...)` argument of a
spawn-context Process: the fd is then duplicated into the child at spawn. Pickled outside spawning
(e.g. sent through a Queue to a running process), DupFd falls back to multiprocessing's
resource_sharer (a background thread in the sender that hands the fd over a Unix socket, once).
Watched pidfds are not carried over; the receiving process watches what it needs itself.
"""

from __future__ import annotations

import math
import os
import select
from collections.abc import Hashable
from collections.abc import Set as AbstractSet
from multiprocessing import reduction
from types import TracebackType
from typing import Any

from ringbuf.procinfo import read_proc_stat

ProcessKey = tuple[int, int]  # (pid, start time in clock ticks): a process identity immune to pid reuse


def timeout_to_poll_ms(timeout: float | None) -> int | None:
    """poll() takes whole milliseconds: round up so a short timeout never becomes a busy zero."""
    if timeout is None:
        return None
    return max(0, math.ceil(timeout * 1000.0))


class Doorbell:
    def __init__(self) -> None:
        self._init_from_fd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))

    def _init_from_fd(self, fd: int) -> None:
        self._fd = fd
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)
        self._pidfd_by_process: dict[ProcessKey, int] = {}
        self._process_by_pidfd: dict[int, ProcessKey] = {}
        self._exited: set[ProcessKey] = set()
        self._reported: set[Hashable] = set()  # producer departures already reported to the waiter

    @classmethod
    def _adopt_fd(cls, fd: int) -> Doorbell:
        os.set_inheritable(fd, False)  # like the original (EFD_CLOEXEC); grandchildren get their own dup
        bell = cls.__new__(cls)
        bell._init_from_fd(fd)
        return bell

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_doorbell, (reduction.DupFd(self._fd),))

    def fileno(self) -> int:
        """The eventfd: register it with `loop.add_reader` (readable while the bell has been rung)."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ring(self) -> None:
        # try/except rather than contextlib.suppress: this is on every publish and a with-block costs more.
        try:  # noqa: SIM105
            os.eventfd_write(self._fd, 1)
        except BlockingIOError:
            pass  # the counter is at its maximum: the bell is rung already

    def drain(self) -> None:
        try:  # noqa: SIM105 (hot path, as ring())
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass  # not rung since the last drain

    def wait(self, timeout: float | None) -> bool:
        """Sleep until the bell is (or has been, since the last drain) rung, or a watched process exits.

        True then, with the ring count drained; False on timeout. Uses no CPU while asleep.
        """
        if self._fd < 0:
            raise ValueError("the doorbell is closed")
        events = self._poller.poll(timeout_to_poll_ms(timeout))
        rung = False
        for fd, _ in events:
            if fd == self._fd:
                rung = True
            else:
                self.note_process_exit(fd)
        if rung:
            os.eventfd_read(self._fd)  # readable, so this cannot block or fail
        return bool(events)

    # -- peer processes -------------------------------------------------------------------------------
    def watch_process(self, pid: int, start_time: int) -> bool:
        """Wake waiters when this process exits. False if it is gone already (then it counts as exited)."""
        key = (pid, start_time)
        if key in self._pidfd_by_process or key in self._exited:
            return key not in self._exited
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._exited.add(key)
            return False
        # The pidfd refers to whatever process had `pid` at open time: check it is the one we mean.
        stat = read_proc_stat(pid)
        if stat is None or stat.start_time != start_time:
            os.close(pidfd)
            self._exited.add(key)
            return False
        self._pidfd_by_process[key] = pidfd
        self._process_by_pidfd[pidfd] = key
        self._poller.register(pidfd, select.POLLIN)
        return True

    def process_exited(self, key: ProcessKey) -> bool:
        """True once a watched process was seen to exit by a wait on this bell."""
        return key in self._exited

    @property
    def exited_processes(self) -> AbstractSet[ProcessKey]:
        """Watched processes seen exiting (a live read-only view: waiters check it on every scan)."""
        return self._exited

    def watched_fds(self) -> list[int]:
        """pidfds of watched processes, for an asyncio loop to add readers on."""
        return list(self._process_by_pidfd)

    def first_report(self, token: Hashable) -> bool:
        """True the first time `token` (a ring's producer departure) is reported through this bell."""
        if token in self._reported:
            return False
        self._reported.add(token)
        return True

    def note_process_exit(self, pidfd: int) -> None:
        """Called with a watched pidfd that became readable (its process exited): stop watching it."""
        key = self._process_by_pidfd.pop(pidfd, None)
        if key is None:
            return
        del self._pidfd_by_process[key]
        self._poller.unregister(pidfd)
        os.close(pidfd)
        self._exited.add(key)

    # -- lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._fd < 0:
            return
        for pidfd in list(self._process_by_pidfd):
            os.close(pidfd)
        self._process_by_pidfd.clear()
        self._pidfd_by_process.clear()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Doorbell:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Doorbell(fd={self._fd}, watching={sorted(self._pidfd_by_process)})"


def _rebuild_doorbell(dup_fd: Any) -> Doorbell:
    return Doorbell._adopt_fd(dup_fd.detach())
