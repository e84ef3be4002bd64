"""The network's record of the inference workers, sans I/O: which are ready, what each holds, where a new
session goes.

Each inference worker (procs/topology.py: a `Place` of role "inference") serves its own range of session
slots with its own model copy. The network keeps one ready record per worker (its `InferenceReady`, or None
while it starts or restarts); the server's capacity is the sum over the ready ones. A new session goes to
the ready worker with the most free slots (the first of them on a tie), so sessions spread over the cards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from procs.topology import Place
from protocol.internal import InferenceReady


@dataclass
class InferenceWorker:
    place: Place
    ready: InferenceReady | None = None  # None: starting, or restarting after a crash or a hang

    @property
    def name(self) -> str:
        return self.place.name

    @property
    def capacity(self) -> int:
        """Sessions it admits now: its engine's batch size once ready (at most its slot range)."""
        return 0 if self.ready is None else min(self.ready.max_sessions, len(self.place.slots))


class InferenceWorkers:
    def __init__(self, places: tuple[Place, ...]) -> None:
        self.workers = [InferenceWorker(place) for place in places]

    def __iter__(self) -> Iterator[InferenceWorker]:
        """The records, in the topology's order."""
        return iter(self.workers)

    def get(self, name: str) -> InferenceWorker | None:
        return next((w for w in self.workers if w.name == name), None)

    def owner(self, slot: int) -> InferenceWorker:
        return next(w for w in self.workers if slot in w.place.slots)

    @property
    def capacity(self) -> int:
        return sum(w.capacity for w in self.workers)

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

    def choose(self, live_in: Callable[[range], int]) -> InferenceWorker | None:
        """The ready worker with the most free slots (`live_in(slots)`: sessions live in a range), None
        when every ready worker is full."""
        best, best_free = None, 0
        for worker in self.workers:
            free = worker.capacity - live_in(worker.place.slots)
            if free > best_free:
                best, best_free = worker, free
        return best
