"""Which rings connect which processes: the one place that says it.

The supervisor's children are a table of `Place`s: the network process, one inference process per device
(each with its own model copy and its own range of session slots), and the VAD process (every slot). The
supervisor creates (and alone unlinks) every ring at start-up, one set per session slot, and hands the
picklable `Topology` to each child at spawn time, with the name of its place. Each process owns one
doorbell; every ring it reads rings that doorbell on publish, so one wait covers all of a process's inputs.

    network   --audio_to_inference[slot]-->  inference-i (its slots)  --audio_to_network[slot]-->  network
    network   --audio_to_vad[slot]-------->  vad
    network   --control_in of each worker-->  worker  --control_out of each worker-->  network
    supervisor --control_in of the network--> network           (a worker went down)

Every process beats on the heartbeat board (its word: its place's `beat`), so the supervisor sees a hung
one. A child attaches its side with `network_links` or `worker_links`.

    slots:   0 .. n-1 | n .. 2n-1 | ...        (n = --max-sessions, one range per inference worker)
    owner:   inference-0 | inference-1 | ...   (`Topology.owner`)
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Literal

from procs.control import ControlChannel
from procs.frames import IN_SLOT_BYTES, OUT_SLOT_BYTES
from ringbuf import Board, BoardSpec, Doorbell, Policy, Ring, RingSpec

Role = Literal["network", "inference", "vad"]

# 1.28 s of audio per ring: far more than a healthy session ever holds, so only a stalled peer fills it,
# and then the oldest audio goes first (counted), which is what a live conversation wants.
# A process beats from its loop at least every half second once it is ready; one silent for this long is
# hung (the supervisor kills and replaces it; the network stops admitting to it sooner: network/workers.py).
HEARTBEAT_TIMEOUT_S = 5.0
AUDIO_RING_FRAMES = 64
CTRL_SLOT_BYTES = 4096
CTRL_RING_SLOTS = 512


@dataclass(frozen=True)
class Place:
    """One child of the supervisor: its row in the topology's table.

    `control_in` is what it is told (the network: by the supervisor; a worker: by the network) and
    `control_out` what a worker tells the network (None for the network)."""

    name: str  # "network", "vad", "inference-0", ...: its key for restarts, logs, /health and /metrics
    role: Role  # which `procs.<role>.main` it runs
    index: int  # among the places of its role
    device: str | None  # an inference worker's torch device; None for the others
    slots: range  # the session slots whose audio it reads
    beat: int  # its word on the heartbeat board
    bell: Doorbell  # rung by every ring it reads
    control_in: RingSpec
    control_out: RingSpec | None


@dataclass(frozen=True)
class Topology:
    max_sessions: int  # session slots in all: one range of `--max-sessions` per inference worker
    audio_to_inference: tuple[RingSpec, ...]  # network -> the slot's inference worker, client audio
    audio_to_vad: tuple[RingSpec, ...]  # network -> VAD, its own copy of the client audio
    audio_to_network: tuple[RingSpec, ...]  # the slot's inference worker -> network, model audio
    places: tuple[Place, ...]  # the network first, then the inference workers, then the VAD
    heartbeats: BoardSpec

    def place(self, name: str) -> Place:
        return next(p for p in self.places if p.name == name)

    @property
    def network(self) -> Place:
        return self.places[0]

    @property
    def vad(self) -> Place:
        return next(p for p in self.places if p.role == "vad")

    @property
    def inference(self) -> tuple[Place, ...]:
        return tuple(p for p in self.places if p.role == "inference")

    @property
    def workers(self) -> tuple[Place, ...]:
        """Every place the network process talks to."""
        return self.places[1:]

    def owner(self, slot: int) -> Place:
        """The inference worker whose model holds `slot`."""
        return next(p for p in self.inference if slot in p.slots)


def descriptors(max_sessions: int, n_places: int) -> int:
    """Descriptors a process that maps every ring of a topology holds for it: a segment each (three audio
    rings per slot, two control rings per worker and one to the network, the heartbeat board) and the
    doorbells' (two each at most)."""
    return 3 * max_sessions + 2 * (n_places - 1) + 1 + 1 + 2 * n_places


class OwnedTopology(contextlib.AbstractContextManager):
    """The supervisor's side: owns the segments and the doorbells, unlinks them on exit.

    `devices`: one inference worker per entry, each serving `sessions_per_worker` slots."""

    def __init__(self, devices: tuple[str, ...], sessions_per_worker: int) -> None:
        if not devices:
            raise ValueError("at least one inference device")
        self._rings: list[Ring] = []
        self._bells: list[Doorbell] = []
        n_places = len(devices) + 2
        self.board = Board.create(n_places)
        try:
            total = len(devices) * sessions_per_worker
            everything = range(total)

            def place(name: str, role: Role, index: int, device: str | None, slots: range) -> Place:
                beat = len(self._bells)
                bell = Doorbell()
                self._bells.append(bell)
                return Place(name=name, role=role, index=index, device=device, slots=slots, beat=beat,
                             bell=bell, control_in=self._control(),
                             control_out=None if role == "network" else self._control())

            places = (
                place("network", "network", 0, None, everything),
                *(place(f"inference-{i}", "inference", i, device,
                        range(i * sessions_per_worker, (i + 1) * sessions_per_worker))
                  for i, device in enumerate(devices)),
                place("vad", "vad", 0, None, everything),
            )

            def audio(slot_bytes: int) -> tuple[RingSpec, ...]:
                return tuple(self._ring(slot_bytes, AUDIO_RING_FRAMES, Policy.DROP_OLDEST)
                             for _ in everything)

            self.topology = Topology(
                max_sessions=total,
                audio_to_inference=audio(IN_SLOT_BYTES),
                audio_to_vad=audio(IN_SLOT_BYTES),
                audio_to_network=audio(OUT_SLOT_BYTES),
                places=places,
                heartbeats=self.board.spec,
            )
        except BaseException:
            self.close()
            raise

    def _ring(self, slot_size: int, capacity: int, policy: Policy) -> RingSpec:
        ring = Ring.create(slot_size, capacity, policy)
        self._rings.append(ring)
        return ring.spec

    def _control(self) -> RingSpec:
        # Control messages must never vanish silently: a full control ring refuses and is counted.
        return self._ring(CTRL_SLOT_BYTES, CTRL_RING_SLOTS, Policy.REFUSE)

    def control_to_network(self, log: logging.Logger) -> ControlChannel:
        """The supervisor's side of its control ring to the network process."""
        network = self.topology.network
        ring = next(r for r in self._rings if r.spec == network.control_in)
        ring.bind_producer(network.bell)
        return ControlChannel(ring, name="supervisor->network", log=log)

    def segment_names(self) -> list[str]:
        """Every shared-memory segment this topology owns (to re-register them if the tracker restarts)."""
        return [ring.spec.name for ring in self._rings] + [self.board.spec.name]

    def close(self) -> None:
        for ring in self._rings:
            ring.close()
        self._rings.clear()
        for bell in self._bells:
            bell.close()
        self.board.close()

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_producer(spec: RingSpec, bell: Doorbell) -> Ring:
    ring = Ring.attach(spec)
    ring.bind_producer(bell)
    return ring


def attach_consumer(spec: RingSpec) -> Ring:
    ring = Ring.attach(spec)
    ring.bind_consumer()
    return ring


@dataclass
class WorkerChannel:
    """The network's two control channels with one worker."""

    place: Place
    to: ControlChannel
    came_from: ControlChannel


@dataclass
class NetworkLinks:
    """The network process's side: it writes every session's audio twice and reads the model's audio."""

    audio_to_inference: list[Ring]  # by slot, each ringing its owner's doorbell
    audio_to_vad: list[Ring]
    audio_from_inference: list[Ring]
    from_supervisor: ControlChannel
    workers: dict[str, WorkerChannel]  # by place name
    bell: Doorbell  # rung by audio_from_inference and every control ring into this process
    heartbeat: Heartbeat


@dataclass
class WorkerLinks:
    """A worker's side (inference or VAD): audio in per slot of its range, model audio out per slot
    (inference only), control both ways, and the doorbell its inputs ring. Index i of its lists is session
    slot `slots[i]`."""

    place: Place
    audio_in: list[Ring]
    audio_out: list[Ring]
    control_in: ControlChannel
    control_out: ControlChannel
    heartbeat: Heartbeat

    @property
    def slots(self) -> range:
        return self.place.slots

    @property
    def bell(self) -> Doorbell:
        return self.place.bell

    @property
    def inputs(self) -> list[Ring]:
        """Every ring this worker waits on."""
        return [*self.audio_in, self.control_in.ring]


def network_links(topo: Topology, log: logging.Logger) -> NetworkLinks:
    network = topo.network
    return NetworkLinks(
        audio_to_inference=[attach_producer(s, topo.owner(slot).bell)
                            for slot, s in enumerate(topo.audio_to_inference)],
        audio_to_vad=[attach_producer(s, topo.vad.bell) for s in topo.audio_to_vad],
        audio_from_inference=[attach_consumer(s) for s in topo.audio_to_network],
        from_supervisor=ControlChannel(attach_consumer(network.control_in), name="supervisor->network",
                                       log=log),
        workers={
            p.name: WorkerChannel(
                place=p,
                to=ControlChannel(attach_producer(p.control_in, p.bell), name=f"network->{p.name}", log=log),
                came_from=ControlChannel(attach_consumer(p.control_out),  # type: ignore[arg-type]
                                         name=f"{p.name}->network", log=log),
            )
            for p in topo.workers
        },
        bell=network.bell,
        heartbeat=Heartbeat(topo.heartbeats, network.beat),
    )


def worker_links(topo: Topology, name: str, log: logging.Logger) -> WorkerLinks:
    """A worker's side of the topology; inference workers get their slots' model-audio rings."""
    place = topo.place(name)
    assert place.control_out is not None, f"{name} is not a worker"
    audio_in = topo.audio_to_inference if place.role == "inference" else topo.audio_to_vad
    return WorkerLinks(
        place=place,
        audio_in=[attach_consumer(audio_in[slot]) for slot in place.slots],
        audio_out=([attach_producer(topo.audio_to_network[slot], topo.network.bell) for slot in place.slots]
                   if place.role == "inference" else []),
        control_in=ControlChannel(attach_consumer(place.control_in), name=f"network->{name}", log=log),
        control_out=ControlChannel(attach_producer(place.control_out, topo.network.bell),
                                   name=f"{name}->network", log=log),
        heartbeat=Heartbeat(topo.heartbeats, place.beat),
    )


class Heartbeat:
    """A process's proof of life: `beat()` stores the time (monotonic ns) in its word of the board, where
    the supervisor reads it. A process beats from its loop, at least every half second."""

    def __init__(self, spec: BoardSpec, index: int) -> None:
        self.board = Board.attach(spec)
        self.index = index

    def beat(self) -> None:
        self.board.set(self.index, time.monotonic_ns())
