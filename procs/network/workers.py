"""The network's record of the inference workers, sans I/O: which are ready, what each holds, where a new
session goes.

Each inference worker (procs/topology.py: a `Place` of role "inference") serves its own range of session
slots with its own model copy. The network keeps one ready record per worker (its `InferenceReady`, or None
while it starts or restarts); the server's room is the sum over the ready ones. A new session goes to the
ready worker with the most free slots (the first of them on a tie), so sessions spread over the cards.

A worker can also freeze (a driver fault, a wedged kernel, a stopped process) long before the supervisor's
heartbeat limit kills it (HEARTBEAT_TIMEOUT_S). Sessions admitted to it meanwhile would only end with 1011,
so the network reads the same heartbeat board sooner: a ready worker whose last beat is older than STALL_NS
is *stalled* and gets no new session until it beats again (its sessions go on, or end when it is killed).
Its loop beats at least every half second, between steps and while it waits, so this holds whether or not
it has sessions; only a single step longer than STALL_NS would look the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from procs.topology import HEARTBEAT_TIMEOUT_S, Place
from protocol.internal import InferenceReady

STALL_NS = 1_500_000_000  # ~19 step periods: far beyond a slow step, well before the heartbeat limit
assert STALL_NS < HEARTBEAT_TIMEOUT_S * 1e9


@dataclass
class InferenceWorker:
    place: Place
    ready: InferenceReady | None = None  # None: starting, or restarting after a crash or a hang

    @property
    def name(self) -> str:
        return self.place.name

    @property
    def capacity(self) -> int:
        """Sessions it holds at once: its engine's batch size once ready (at most its slot range)."""
        return 0 if self.ready is None else min(self.ready.max_sessions, len(self.place.slots))


class InferenceWorkers:
    def __init__(self, places: tuple[Place, ...], last_beat: Callable[[Place], int]) -> None:
        """`last_beat(place)`: the worker's last heartbeat (monotonic ns; 0: none since it started)."""
        self.workers = [InferenceWorker(place) for place in places]
        self.last_beat = last_beat

    def __iter__(self) -> Iterator[InferenceWorker]:
        """The records, in the topology's order."""
        return iter(self.workers)

    def get(self, name: str) -> InferenceWorker | None:
        return next((w for w in self.workers if w.name == name), None)

    def owner(self, slot: int) -> InferenceWorker:
        return next(w for w in self.workers if slot in w.place.slots)

    @property
    def any_ready(self) -> bool:
        return any(w.ready is not None for w in self.workers)

    @property
    def all_ready(self) -> bool:
        return all(w.ready is not None for w in self.workers)

    @property
    def first_ready(self) -> InferenceReady | None:
        """What the model is (every worker loads the same one): from the first ready worker."""
        return next((w.ready for w in self.workers if w.ready is not None), None)

    def stalled(self, worker: InferenceWorker, now_ns: int) -> bool:
        beat = self.last_beat(worker.place)
        return worker.ready is not None and beat != 0 and now_ns - beat > STALL_NS

    def status(self, worker: InferenceWorker, now_ns: int) -> str:
        if worker.ready is None:
            return "starting"
        return "stalled" if self.stalled(worker, now_ns) else "ready"

    def room(self, worker: InferenceWorker, now_ns: int) -> int:
        """Sessions it may hold now: its capacity, or none while it is stalled."""
        return 0 if self.stalled(worker, now_ns) else worker.capacity

    def free(self, live_in: Callable[[range], int], now_ns: int) -> int:
        """Sessions the server may admit now (`live_in(slots)`: sessions live in a range)."""
        return sum(max(0, self.room(w, now_ns) - live_in(w.place.slots)) for w in self.workers)

    def choose(self, live_in: Callable[[range], int], now_ns: int) -> InferenceWorker | None:
        """The ready worker with the most free slots, None when every ready worker is full or stalled."""
        best, best_free = None, 0
        for worker in self.workers:
            free = self.room(worker, now_ns) - live_in(worker.place.slots)
            if free > best_free:
                best, best_free = worker, free
        return best
