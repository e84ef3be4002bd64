"""Which rings connect which processes: the one place that says it.

The supervisor creates (and alone unlinks) every ring at start-up, one set per session slot, and hands the
picklable `Topology` to each child at spawn time. Each consumer process owns one doorbell; every ring it
reads rings that doorbell on publish, so one wait covers all of a process's inputs.

    network   --audio_to_inference[slot]-->  inference  --audio_to_network[slot]-->  network
    network   --audio_to_vad[slot]-------->  VAD
    network   --ctrl_to_inference / ctrl_to_vad-->  workers  --ctrl_from_inference / ctrl_from_vad-->  network
    supervisor --ctrl_to_network--> network           (a worker went down)

Every process also beats on the heartbeat board (its word: ROLES order), so the supervisor sees a hung one.
A child attaches its side with `network_links`, `inference_links` or `vad_links`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from procs.control import ControlChannel
from procs.frames import IN_SLOT_BYTES, OUT_SLOT_BYTES
from ringbuf import Board, BoardSpec, Doorbell, Policy, Ring, RingSpec

ROLES = ("network", "inference", "vad")  # the supervisor's children; their heartbeat words, in this order

# 1.28 s of audio per ring: far more than a healthy session ever holds, so only a stalled peer fills it,
# and then the oldest audio goes first (counted), which is what a live conversation wants.
AUDIO_RING_FRAMES = 64
CTRL_SLOT_BYTES = 4096
CTRL_RING_SLOTS = 512


def descriptors(max_sessions: int) -> int:
    """Descriptors a process that maps every ring of a topology holds for it: a segment each (three audio
    rings per slot, five control rings, the heartbeat board) and the three doorbells' (two each at most)."""
    return 3 * max_sessions + 5 + 1 + 2 * len(ROLES)


@dataclass(frozen=True)
class Topology:
    max_sessions: int
    audio_to_inference: tuple[RingSpec, ...]  # network -> inference, client audio per slot
    audio_to_vad: tuple[RingSpec, ...]  # network -> VAD, its own copy of the client audio
    audio_to_network: tuple[RingSpec, ...]  # inference -> network, model audio per slot
    ctrl_to_inference: RingSpec
    ctrl_to_vad: RingSpec
    ctrl_from_inference: RingSpec
    ctrl_from_vad: RingSpec
    ctrl_to_network: RingSpec  # from the supervisor
    heartbeats: BoardSpec
    bell_network: Doorbell
    bell_inference: Doorbell
    bell_vad: Doorbell


class OwnedTopology(contextlib.AbstractContextManager):
    """The supervisor's side: owns the segments and the doorbells, unlinks them on exit."""

    def __init__(self, max_sessions: int) -> None:
        self._rings: list[Ring] = []
        self._bells = [Doorbell() for _ in range(3)]
        self.board = Board.create(len(ROLES))
        try:

            def audio(slot_bytes: int) -> tuple[RingSpec, ...]:
                return tuple(
                    self._ring(slot_bytes, AUDIO_RING_FRAMES, Policy.DROP_OLDEST) for _ in range(max_sessions)
                )

            def ctrl() -> RingSpec:
                # Control messages must never vanish silently: a full control ring refuses and is counted.
                return self._ring(CTRL_SLOT_BYTES, CTRL_RING_SLOTS, Policy.REFUSE)

            self.topology = Topology(
                max_sessions=max_sessions,
                audio_to_inference=audio(IN_SLOT_BYTES),
                audio_to_vad=audio(IN_SLOT_BYTES),
                audio_to_network=audio(OUT_SLOT_BYTES),
                ctrl_to_inference=ctrl(),
                ctrl_to_vad=ctrl(),
                ctrl_from_inference=ctrl(),
                ctrl_from_vad=ctrl(),
                ctrl_to_network=ctrl(),
                heartbeats=self.board.spec,
                bell_network=self._bells[0],
                bell_inference=self._bells[1],
                bell_vad=self._bells[2],
            )
        except BaseException:
            self.close()
            raise

    def _ring(self, slot_size: int, capacity: int, policy: Policy) -> RingSpec:
        ring = Ring.create(slot_size, capacity, policy)
        self._rings.append(ring)
        return ring.spec

    def control_to_network(self, log: logging.Logger) -> ControlChannel:
        """The supervisor's side of its control ring to the network process."""
        ring = next(r for r in self._rings if r.spec == self.topology.ctrl_to_network)
        ring.bind_producer(self.topology.bell_network)
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
class NetworkLinks:
    """The network process's side: it writes every session's audio twice and reads the model's audio."""

    audio_to_inference: list[Ring]
    audio_to_vad: list[Ring]
    audio_from_inference: list[Ring]
    to_inference: ControlChannel
    to_vad: ControlChannel
    from_workers: list[ControlChannel]  # the supervisor's, the inference's and the VAD's
    bell: Doorbell  # rung by audio_from_inference and every control ring into this process
    heartbeat: Heartbeat


@dataclass
class WorkerLinks:
    """A worker's side (inference or VAD): audio in per slot, model audio out per slot (inference only),
    control both ways, and the doorbell its inputs ring."""

    audio_in: list[Ring]
    audio_out: list[Ring]
    control_in: ControlChannel
    control_out: ControlChannel
    bell: Doorbell
    heartbeat: Heartbeat

    @property
    def inputs(self) -> list[Ring]:
        """Every ring this worker waits on."""
        return [*self.audio_in, self.control_in.ring]


def network_links(topo: Topology, log: logging.Logger) -> NetworkLinks:
    return NetworkLinks(
        audio_to_inference=[attach_producer(s, topo.bell_inference) for s in topo.audio_to_inference],
        audio_to_vad=[attach_producer(s, topo.bell_vad) for s in topo.audio_to_vad],
        audio_from_inference=[attach_consumer(s) for s in topo.audio_to_network],
        to_inference=ControlChannel(
            attach_producer(topo.ctrl_to_inference, topo.bell_inference), name="network->inference", log=log
        ),
        to_vad=ControlChannel(attach_producer(topo.ctrl_to_vad, topo.bell_vad), name="network->vad", log=log),
        # The supervisor's first: a `WorkerDown` queued before a restarted worker's `InferenceReady` in the
        # same batch must be handled before it, not after (which would leave the server "starting").
        from_workers=[
            ControlChannel(attach_consumer(topo.ctrl_to_network), name="supervisor->network", log=log),
            ControlChannel(attach_consumer(topo.ctrl_from_inference), name="inference->network", log=log),
            ControlChannel(attach_consumer(topo.ctrl_from_vad), name="vad->network", log=log),
        ],
        bell=topo.bell_network,
        heartbeat=Heartbeat(topo.heartbeats, "network"),
    )


def inference_links(topo: Topology, log: logging.Logger) -> WorkerLinks:
    return WorkerLinks(
        audio_in=[attach_consumer(s) for s in topo.audio_to_inference],
        audio_out=[attach_producer(s, topo.bell_network) for s in topo.audio_to_network],
        control_in=ControlChannel(
            attach_consumer(topo.ctrl_to_inference), name="network->inference", log=log
        ),
        control_out=ControlChannel(
            attach_producer(topo.ctrl_from_inference, topo.bell_network), name="inference->network", log=log
        ),
        bell=topo.bell_inference,
        heartbeat=Heartbeat(topo.heartbeats, "inference"),
    )


def vad_links(topo: Topology, log: logging.Logger) -> WorkerLinks:
    return WorkerLinks(
        audio_in=[attach_consumer(s) for s in topo.audio_to_vad],
        audio_out=[],
        control_in=ControlChannel(attach_consumer(topo.ctrl_to_vad), name="network->vad", log=log),
        control_out=ControlChannel(
            attach_producer(topo.ctrl_from_vad, topo.bell_network), name="vad->network", log=log
        ),
        bell=topo.bell_vad,
        heartbeat=Heartbeat(topo.heartbeats, "vad"),
    )


class Heartbeat:
    """A process's proof of life: `beat()` stores the time (monotonic ns) in its word of the board, where
    the supervisor reads it. A process beats from its loop, at least every half second."""

    def __init__(self, spec: BoardSpec, role: str) -> None:
        self.board = Board.attach(spec)
        self.index = ROLES.index(role)

    def beat(self) -> None:
        self.board.set(self.index, time.monotonic_ns())
