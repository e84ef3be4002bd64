"""The network's record of the inference workers, sans I/O: which are ready, what each holds, where a new
session goes.

Each inference worker (procs/topology.py: a `Place` of role "inference") serves its own range of session
slots with its own model copy. The network keeps one ready record per worker (its `InferenceReady`, or None
while it starts or restarts); the server's capacity is the sum over the ready ones. A new session goes to
the ready worker with the most free slots (the first of them on a tie), so sessions spread over the cards.

A worker can also freeze (a driver fault, a wedged kernel) long before the supervisor's heartbeat limit
kills it (5 s). Sessions admitted to it meanwhile would only end with 1011, so the network notices sooner:
a worker owes a step once one of its slots has been handed OWED_FRAMES frames since its last step (two
blocks: more than step clock alignment ever holds back); one that owes a step for STALL_NS (1.5 s) is
*stalled* and has no room for new sessions until it steps again (its sessions go on, or end when it is
killed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from procs.topology import Place
from protocol import FRAMES_PER_BLOCK
from protocol.internal import InferenceReady

OWED_FRAMES = 2 * FRAMES_PER_BLOCK
STALL_NS = 1_500_000_000  # ~19 step periods: far beyond a slow step, well before the 5 s heartbeat limit


@dataclass
class InferenceWorker:
    place: Place
    ready: InferenceReady | None = None  # None: starting, or restarting after a crash or a hang
    owed_since_ns: int | None = None  # when one of its slots was first handed OWED_FRAMES since its last step

    @property
    def name(self) -> str:
        return self.place.name

    @property
    def capacity(self) -> int:
        """Sessions it admits now: its engine's batch size once ready (at most its slot range)."""
        return 0 if self.ready is None else min(self.ready.max_sessions, len(self.place.slots))

    def stalled(self, now_ns: int) -> bool:
        return self.owed_since_ns is not None and now_ns - self.owed_since_ns > STALL_NS

    def room(self, now_ns: int) -> int:
        """Sessions it may hold now: its capacity, or none while it is stalled."""
        return 0 if self.stalled(now_ns) else self.capacity

    def status(self, now_ns: int) -> str:
        if self.ready is None:
            return "starting"
        return "stalled" if self.stalled(now_ns) else "ready"


class InferenceWorkers:
    def __init__(self, places: tuple[Place, ...]) -> None:
        self.workers = [InferenceWorker(place) for place in places]
        self._unstepped = {slot: 0 for place in places for slot in place.slots}  # frames since its last step

    def __iter__(self) -> Iterator[InferenceWorker]:
        """The records, in the topology's order."""
        return iter(self.workers)

    def get(self, name: str) -> InferenceWorker | None:
        return next((w for w in self.workers if w.name == name), None)

    def owner(self, slot: int) -> InferenceWorker:
        return next(w for w in self.workers if slot in w.place.slots)

    def room(self, now_ns: int) -> int:
        """Sessions the server may hold now: the ready workers' that are not stalled."""
        return sum(w.room(now_ns) for w in self.workers)

    # ---- what the network sees of each worker's progress ----------------------------------------------
    def fed(self, slot: int, now_ns: int) -> None:
        """A frame of `slot` went to its worker."""
        self._unstepped[slot] += 1
        worker = self.owner(slot)
        if self._unstepped[slot] >= OWED_FRAMES and worker.owed_since_ns is None:
            worker.owed_since_ns = now_ns

    def stepped(self, worker: InferenceWorker) -> None:
        """It ran a step: it owes nothing."""
        worker.owed_since_ns = None
        for slot in worker.place.slots:
            self._unstepped[slot] = 0

    def left(self, slot: int) -> None:
        """The slot's session ended: frames it was handed are owed no more."""
        self._unstepped[slot] = 0
        worker = self.owner(slot)
        if all(self._unstepped[s] < OWED_FRAMES for s in worker.place.slots):
            worker.owed_since_ns = None

    def down(self, worker: InferenceWorker) -> None:
        """It crashed or hung and is being restarted."""
        worker.ready = None
        self.stepped(worker)

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

    def choose(self, live_in: Callable[[range], int], now_ns: int) -> InferenceWorker | None:
        """The ready worker with the most free slots (`live_in(slots)`: sessions live in a range), None
        when every ready worker is full or stalled."""
        best, best_free = None, 0
        for worker in self.workers:
            free = worker.room(now_ns) - live_in(worker.place.slots)
            if free > best_free:
                best, best_free = worker, free
        return best
