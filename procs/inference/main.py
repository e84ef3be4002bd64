"""Inference process: client audio from the rings -> one batched model step -> model audio to the rings.

Per session slot the process keeps a streaming 16 -> 24 kHz resampler and an 80 ms block being filled;
every frame in the rings is read at once, and each full block joins the slot's queue in the scheduler
(procs/inference/clock.py), so a clump of frames is kept whole. When a step runs, the oldest queued block
of every slot that has one takes part in one batched encode -> LM step -> decode (`Engine.step_batch`);
slots without one are masked and keep their state. Each decoded block leaves as four 20 ms frames.

The engine's batch size is the one truth about capacity: the loop serves that many slots, and says so in
its `InferenceReady`, and the network process admits exactly that many sessions.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np

from procs.audio.resample import Resampler16to24, float_to_int16
from procs.config import ServerConfig
from procs.frames import write_out_frame
from procs.inference.clock import Feed, ImmediateScheduler, ReadyBlock, Scheduler, StepScheduler
from procs.model.engine import Engine, EngineOOM
from procs.model.loader import load_engine
from procs.model.torch_setup import flush_subnormals, prepare_torch
from procs.runtime import LogThrottle, setup_child
from procs.topology import Topology, WorkerLinks, inference_links
from procs.worker import WorkerSessions
from protocol import FRAMES_PER_BLOCK, OUT_FRAME_SAMPLES, ErrorCode
from protocol.internal import InferenceReady, ModelText, NetworkHello, SlotError, StepStats
from ringbuf import Ring, wait_any

log = logging.getLogger("inference")

IDLE_WAIT_S = 0.5


@dataclass(frozen=True, slots=True)
class QueuedBlock:
    """An 80 ms block of a session's audio at 24 kHz, queued for a step (the scheduler holds the queue)."""

    pcm: np.ndarray  # 1920 float32
    t_in_ns: int  # when the network received its last frame
    resample_ns: int  # resampling that frame took


@dataclass
class SlotState:
    """One batch slot's streaming state outside the model."""

    resampler: Resampler16to24 = field(default_factory=Resampler16to24)
    block: np.ndarray = field(default_factory=lambda: np.zeros(1920, dtype=np.float32))
    fill: int = 0
    opened_ns: int = 0
    out_seq: int = 0
    dropped: int = 0  # input frames this session lost: the model could not keep up, or the ring overflowed
    realigned: int = 0  # input frames dropped or repeated to keep it on the step clock
    skipped: int = 0  # first frames skipped to place it on the step clock
    audio_t_ms: float = 0.0

    def start(self, opened_ns: int) -> None:
        self.resampler.reset()
        self.fill = 0
        self.opened_ns = opened_ns
        self.out_seq = 0
        self.dropped = 0
        self.realigned = 0
        self.skipped = 0
        self.audio_t_ms = 0.0


def make_scheduler(step_clock: str, engine_name: str, n_slots: int) -> Scheduler[QueuedBlock]:
    """`--step-clock`: "on" steps on one 80 ms clock, "off" steps each block as soon as it is ready, "auto"
    is on for a model and off for the loopback engine (whose step costs nothing)."""
    if step_clock == "off" or (step_clock == "auto" and engine_name == "loopback"):
        return ImmediateScheduler[QueuedBlock](n_slots)
    return StepScheduler[QueuedBlock](n_slots)


class InferenceLoop:
    def __init__(self, links: WorkerLinks, engine: Engine, stop: threading.Event, step_clock: str = "auto"
                 ) -> None:
        self.links, self.engine, self.stop = links, engine, stop
        self.n = engine.batch_size  # the rings may be more: the network admits only this many sessions
        self.audio_in = links.audio_in[: self.n]
        self.slots = [SlotState() for _ in range(self.n)]
        self.sessions = WorkerSessions(self.n)
        self.batch = np.zeros((self.n, engine.frame_samples), dtype=np.float32)
        self.scheduler = make_scheduler(step_clock, engine.name, self.n)
        self.warnings = LogThrottle(period_s=5.0)

    def run(self) -> None:
        inputs = [*self.audio_in, self.links.control_in.ring]
        while not self.stop.is_set():
            self.links.heartbeat.beat()
            now = time.monotonic_ns()
            deadline = self.scheduler.deadline_ns()
            if self.scheduler.should_step(now):  # queued work (a clump's second block, a catch-up, an owed
                timeout = 0.0  # tick): round the loop at once, taking in what came meanwhile
            else:
                timeout = IDLE_WAIT_S if deadline is None else max(0.0, (deadline - now) / 1e9)
            wait_any(inputs, self.links.bell, min(timeout, IDLE_WAIT_S))
            for msg in self.links.control_in.receive():
                if isinstance(msg, NetworkHello):
                    self.forget_all()
                    continue
                if (closed := self.sessions.apply(msg)) is not None:
                    self.scheduler.close(closed.slot)
                    log.info("session=%s slot=%d: closed (%s)", closed.session_id, closed.slot, closed.reason)
            for slot, ring in enumerate(self.audio_in):
                self.drain_audio(slot, ring)
            now = time.monotonic_ns()
            if self.scheduler.should_step(now):
                blocks = [b for b in self.scheduler.take_step(now) if self.sessions.is_open(b.slot)]
                if blocks:
                    self.step(blocks)

    def announce(self) -> None:
        engine = self.engine
        self.links.control_out.send(InferenceReady(model=engine.name, demo_weights=engine.demo_weights,
                                                   max_sessions=self.n, device=engine.device))

    def forget_all(self) -> None:
        """A network process (re)started: its sessions are gone; say we are ready for new ones."""
        for slot in self.sessions.forget_all(self.audio_in):
            self.scheduler.close(slot)
        log.info("a network process (re)started: every session forgotten")
        self.announce()

    # ---- input --------------------------------------------------------------------------------------------
    def drain_audio(self, slot: int, ring: Ring) -> None:
        """Every frame the slot's ring holds, into its blocks; complete blocks queue for a step (so a burst
        of frames is kept whole: the scheduler's queue, not the ring, is where blocks wait)."""
        st = self.slots[slot]
        for frame in self.sessions.read(slot, ring):
            if frame.first:
                self.open_slot(slot, frame.t_ns)
            feed = self.scheduler.frame(slot, frame.seq, frame.t_ns)
            if feed is Feed.SKIP:
                st.skipped += 1
                continue
            if feed is not Feed.ONCE:
                st.realigned += 1
                log.debug("session=%s slot=%d: realigned to the step clock (%s a frame)",
                          self.sessions.session_id(slot), slot, feed.value)
            for _ in range(feed.times):
                self.push_frame(slot, st, frame.pcm, frame.seq, frame.t_ns)
        st.dropped += self.sessions.take_lost(slot)

    def open_slot(self, slot: int, t_ns: int) -> None:
        st = self.slots[slot]
        st.start(opened_ns=t_ns)
        self.engine.reset_slot(slot)
        self.scheduler.open(slot)
        log.info("session=%s slot=%d: started", self.sessions.session_id(slot), slot)

    def push_frame(self, slot: int, st: SlotState, pcm: np.ndarray, seq: int, t_ns: int) -> None:
        t0 = time.perf_counter_ns()
        out = st.resampler.process(pcm)
        resample_ns = time.perf_counter_ns() - t0
        st.block[st.fill : st.fill + out.shape[0]] = out
        st.fill += out.shape[0]
        if st.fill < st.block.shape[0]:
            return
        st.fill = 0
        block = QueuedBlock(st.block.copy(), t_in_ns=t_ns, resample_ns=resample_ns)
        if self.scheduler.block_complete(slot, seq, t_ns, block):  # the model cannot keep up: oldest goes
            st.dropped += FRAMES_PER_BLOCK
            held_back = self.warnings.allow(slot, time.monotonic())
            if held_back is not None:  # a flood must not flood the log: once per slot every 5 s
                log.warning("session=%s slot=%d: fell behind, %d input frames dropped so far (%d warnings "
                            "held back)", self.sessions.session_id(slot), slot, st.dropped, held_back)

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self, blocks: list[ReadyBlock[QueuedBlock]]) -> None:
        ready = np.zeros(self.n, dtype=bool)
        for block in blocks:
            ready[block.slot] = True
            self.batch[block.slot] = block.payload.pcm
        t0 = time.monotonic_ns()
        try:
            result = self.engine.step_batch(self.batch, ready)
        except EngineOOM:
            self.on_oom()
            return
        step_ns = time.monotonic_ns() - t0
        waits_ns = []
        for block in blocks:
            slot, st = block.slot, self.slots[block.slot]
            # The wait is counted from when the block's last frame reached the server, so what a block
            # spends queued behind a burst is in the session's `latency` figures.
            queue_ns = max(0, t0 - block.ready_ns)
            waits_ns.append(queue_ns)
            if result.text[slot]:
                gen = self.sessions.gen(slot)
                self.links.control_out.send(
                    ModelText(slot=slot, gen=gen, text=result.text[slot], t_ms=st.audio_t_ms)
                )
            st.audio_t_ms += 80.0
            if result.has_audio[slot]:
                self.emit(slot, st, block.payload, result.pcm[slot], queue_ns, step_ns)
        self.links.control_out.send(
            StepStats(step_s=step_ns / 1e9, batch=len(blocks), wait_s=[w / 1e9 for w in waits_ns])
        )

    def emit(self, slot: int, st: SlotState, block: QueuedBlock, pcm: np.ndarray, queue_ns: int,
             step_ns: int) -> None:
        t0 = time.perf_counter_ns()
        samples = float_to_int16(pcm)
        resample_us = (block.resample_ns + time.perf_counter_ns() - t0) // 1000
        ring = self.links.audio_out[slot]
        for pos in range(FRAMES_PER_BLOCK):
            buf = ring.reserve()  # never None: the ring drops its oldest frame instead (DROP_OLDEST)
            n = write_out_frame(
                buf,
                samples[pos * OUT_FRAME_SAMPLES : (pos + 1) * OUT_FRAME_SAMPLES],
                seq=st.out_seq,
                t_in_ns=block.t_in_ns,
                gen=self.sessions.gen(slot),
                block_pos=pos,
                queue_us=queue_ns // 1000,
                step_us=step_ns // 1000,
                resample_us=resample_us,
                dropped=st.dropped,
                realigned=st.realigned,
                skipped=st.skipped,
            )
            ring.publish(n)
            st.out_seq += 1

    def on_oom(self) -> None:
        """GPU memory ran out: the newest session goes (told `capacity`), the others keep running."""
        open_slots = [i for i in range(self.n) if self.sessions.is_open(i)]
        if not open_slots:
            return
        newest = max(open_slots, key=lambda i: self.slots[i].opened_ns)
        gen = self.sessions.gen(newest)
        log.error("session=%s slot=%d: GPU out of memory; closing the newest session",
                  self.sessions.session_id(newest), newest)
        self.links.control_out.send(
            SlotError(slot=newest, gen=gen, code=ErrorCode.CAPACITY, msg="Server at capacity (GPU memory)")
        )
        self.sessions.close(newest)
        self.scheduler.close(newest)


def main(cfg: ServerConfig, topo: Topology, status: Connection) -> None:
    stop = threading.Event()
    # The stop flag is set from a signal handler; ring our own doorbell so a blocked wait returns at once.
    setup_child(cfg.log_level, lambda: (stop.set(), topo.bell_inference.ring()),
                log_format=cfg.log_format)
    prepare_torch(cfg.device)  # before load_engine imports moshi
    flush_subnormals(cfg.device)
    # One torch thread on a CPU by default: measured on 2 cores, two threads stall steps for 1-2 s whenever
    # the network and VAD processes want the other core.
    threads = cfg.threads or (1 if cfg.device == "cpu" else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = load_engine(
        cfg.engine,
        source=cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.max_sessions,
        log=log,
        footprint=cfg.footprint,
        session_memory_bytes=None if cfg.session_memory_mb is None else int(cfg.session_memory_mb * 2**20),
        card_memory_bytes=None if cfg.gpu_memory_gb is None else int(cfg.gpu_memory_gb * 1e9),
        gpu_memory_fraction=cfg.gpu_memory_fraction,
    )
    t0 = time.monotonic()
    engine.warmup()
    log.info("warm-up done in %.1f s", time.monotonic() - t0)
    loop = InferenceLoop(inference_links(topo, log), engine, stop, cfg.step_clock)
    loop.forget_all()  # a restarted process: whatever is queued belongs to sessions that were ended
    loop.run()
    log.info("inference stopped")
