"""VAD process: Silero VAD on the CPU over its own copy of every session's input.

Reading a separate ring means voice-activity detection can never delay the model step. One batched
Silero call serves every session that has a full 32 ms window; edges carry the time in the session's
own audio clock.
"""

from __future__ import annotations

import logging
import threading
from multiprocessing.connection import Connection

from procs.audio.silero import StreamingVad
from procs.config import ServerConfig
from procs.runtime import setup_child
from procs.topology import Topology, WorkerLinks, worker_links
from procs.worker import IDLE_WAIT_S, WorkerSessions
from protocol import FRAME_MS
from protocol.internal import NetworkHello, VadReady, VoiceActivity
from ringbuf import wait_any

log = logging.getLogger("vad")


class VadLoop:
    def __init__(self, links: WorkerLinks, stop: threading.Event) -> None:
        self.links, self.stop = links, stop
        self.vad = StreamingVad(len(links.audio_in))
        self.sessions = WorkerSessions(links.slots)
        # Where each slot's VAD clock starts in its session's audio: 0, unless this process was restarted
        # while the session went on (then its first frame's index x 20 ms).
        self.origin_ms = [0.0] * len(links.audio_in)

    def run(self) -> None:
        inputs = self.links.inputs
        while not self.stop.is_set():
            self.links.heartbeat.beat()
            wait_any(inputs, self.links.bell, IDLE_WAIT_S)
            for msg in self.links.control_in.receive():
                if isinstance(msg, NetworkHello):
                    self.forget_all()
                else:
                    self.sessions.apply(msg)
            for slot, ring in enumerate(self.links.audio_in):
                for frame in self.sessions.read(slot, ring):
                    if frame.first:
                        self.vad.reset(slot)
                        self.origin_ms[slot] = frame.seq * FRAME_MS
                    self.vad.push(slot, frame.pcm)
            for edge in self.vad.process():
                if not self.sessions.is_open(edge.slot):
                    continue
                slot = self.links.slots[edge.slot]
                log.debug("session=%s slot=%d: speech %s at %.0f ms",
                          self.sessions.session_id(edge.slot), slot, edge.event, edge.t_ms)
                self.links.control_out.send(
                    VoiceActivity(slot=slot, gen=self.sessions.gen(edge.slot), event=edge.event,
                                  t_ms=self.origin_ms[edge.slot] + edge.t_ms)
                )


    def forget_all(self) -> None:
        """A network process (re)started: its sessions are gone; say we are ready for new ones."""
        for slot in self.sessions.forget_all(self.links.audio_in):
            self.vad.reset(slot)
        self.links.control_out.send(VadReady(model="silero-vad"))


def main(cfg: ServerConfig, topo: Topology, name: str, status: Connection) -> None:
    stop = threading.Event()
    bell = topo.place(name).bell
    setup_child(cfg.log_level, lambda: (stop.set(), bell.ring()), log_format=cfg.log_format)
    loop = VadLoop(worker_links(topo, name, log), stop)
    loop.forget_all()  # a restarted process: whatever is queued belongs to sessions that were ended
    loop.run()
    log.info("vad stopped")
