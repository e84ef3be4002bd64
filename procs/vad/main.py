"""VAD process: Silero VAD on the CPU over its own copy of every session's input.

Reading a separate ring means voice-activity detection can never delay the model step. One batched
Silero call serves every session that has a full 32 ms window; events carry the time in the session's
own audio clock.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing.connection import Connection

from procs.audio.silero import StreamingVad
from procs.config import ServerConfig
from procs.frames import FrameFate, SlotGenerations, read_in_frame
from procs.runtime import setup_child
from procs.topology import Topology, attach_consumer, attach_producer
from protocol.internal import Ready, SessionClose, SessionOpen, VadEvent, decode_internal, encode_internal
from ringbuf import wait_any

log = logging.getLogger("vad")
IDLE_WAIT_S = 0.5


class VadLoop:
    def __init__(self, topo: Topology, stop: threading.Event) -> None:
        self.stop = stop
        self.n = topo.max_sessions
        self.inputs = [attach_consumer(s) for s in topo.audio_to_vad]
        self.ctrl_in = attach_consumer(topo.ctrl_to_vad)
        self.ctrl_out = attach_producer(topo.ctrl_from_vad, topo.bell_network)
        self.bell = topo.bell_vad
        self.vad = StreamingVad(self.n)
        self.gens = SlotGenerations(self.n)
        self.session_ids: dict[tuple[int, int], str] = {}

    def send(self, msg: object) -> None:
        if not self.ctrl_out.try_write(encode_internal(msg)):
            log.error("control ring to network full, lost %s", type(msg).__name__)

    def run(self) -> None:
        rings = [*self.inputs, self.ctrl_in]
        while not self.stop.is_set():
            wait_any(rings, self.bell, IDLE_WAIT_S)
            self.drain_control()
            for slot in range(self.n):
                self.drain_audio(slot)
            for ev in self.vad.process():
                gen = self.gens.current[ev.slot]
                if self.gens.is_open(ev.slot):
                    sid = self.session_ids.get((ev.slot, gen), "")
                    log.debug("session=%s slot=%d: speech %s at %.0f ms", sid, ev.slot, ev.event, ev.t_ms)
                    self.send(VadEvent(slot=ev.slot, gen=gen, session_id=sid, event=ev.event, t_ms=ev.t_ms))

    def drain_control(self) -> None:
        while (raw := self.ctrl_in.read_bytes()) is not None:
            match decode_internal(raw):
                case SessionOpen(slot=slot, gen=gen, session_id=sid):
                    self.session_ids[(slot, gen)] = sid
                case SessionClose(slot=slot, gen=gen):
                    self.gens.close(slot, gen)
                    self.session_ids.pop((slot, gen), None)
                case _:
                    pass

    def drain_audio(self, slot: int) -> None:
        ring = self.inputs[slot]
        while (view := ring.peek()) is not None:
            hdr, pcm = read_in_frame(view)
            pcm = pcm.copy()
            gen = int(hdr["gen"])
            if not ring.release():
                continue
            fate = self.gens.classify(slot, gen)
            if fate is FrameFate.STALE:
                continue
            if fate is FrameFate.NEW_SESSION:
                self.vad.reset(slot)
            self.vad.push(slot, pcm)


def main(cfg: ServerConfig, topo: Topology, status: Connection) -> None:
    stop = threading.Event()
    setup_child(cfg.log_level, lambda: (stop.set(), topo.bell_vad.ring()))
    loop = VadLoop(topo, stop)
    loop.send(Ready(proc="vad", info={"model": "silero-vad"}))
    loop.run()
    log.info("vad stopped")
