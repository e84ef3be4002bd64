"""Inference process: client audio from the rings -> one batched model step -> model audio to the rings.

Per session slot the process keeps a streaming 16 -> 24 kHz resampler and an 80 ms block being filled.
When a step runs (see `StepPolicy`), every slot with a full block takes part in one batched
encode -> LM step -> decode (`Engine.step_batch`); slots without one are masked and keep their state.
Each decoded block leaves as four 20 ms frames.
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
from procs.frames import FrameFate, SlotGenerations, read_in_frame, write_out_frame
from procs.model.engine import Engine, EngineOOM, load_engine
from procs.runtime import setup_child
from procs.topology import Topology, attach_consumer, attach_producer
from protocol import OUT_FRAME_SAMPLES
from protocol.internal import (
    Ready,
    SessionClose,
    SessionOpen,
    SlotError,
    StepStats,
    Transcript,
    decode_internal,
    encode_internal,
)
from ringbuf import Ring, wait_any

log = logging.getLogger("inference")

FRAME_NS = 20_000_000
BLOCK_NS = 80_000_000
FRAMES_PER_BLOCK = 4
# More unread input than this means the session fell behind: its oldest frames are dropped (counted)
# down to KEEP_FRAMES, so delay cannot grow without bound.
MAX_BACKLOG_FRAMES = 12
KEEP_FRAMES = 4
MOSHI_BATCH_WAIT_MS = 25.0
IDLE_WAIT_S = 0.5


@dataclass
class StepPolicy:
    """When a batched step runs.

    A masked slot costs as much compute as a live one, so a step is worth running for the whole batch
    at once: it runs as soon as every open session has a full block, or when the oldest full block has
    waited `max_wait_ns`, whichever comes first. To make "every session ready at once" the usual case,
    a new session's block boundary is aligned to the phase of the running steps (`alignment_skip`): its
    first 0-3 frames are skipped so that its blocks complete within 10 ms of the others'. With
    `max_wait_ns == 0` (loopback, where a step is free) a block is stepped the moment it is full and no
    frame is ever skipped.
    """

    max_wait_ns: int
    last_step_ns: int | None = None

    def should_step(self, now_ns: int, ready_at: list[int | None], open_slots: list[bool]) -> bool:
        waiting = [t for t, o in zip(ready_at, open_slots, strict=True) if o and t is not None]
        if not waiting:
            return False
        if all(t is not None for t, o in zip(ready_at, open_slots, strict=True) if o):
            return True
        return now_ns - min(waiting) >= self.max_wait_ns

    def next_deadline_ns(self, ready_at: list[int | None]) -> int | None:
        waiting = [t for t in ready_at if t is not None]
        return min(waiting) + self.max_wait_ns if waiting else None

    def alignment_skip(self, first_frame_ns: int, others_open: bool) -> int:
        if self.max_wait_ns == 0 or not others_open or self.last_step_ns is None:
            return 0

        def distance(k: int) -> int:
            done = first_frame_ns + (FRAMES_PER_BLOCK - 1 + k) * FRAME_NS
            phase = (done - self.last_step_ns) % BLOCK_NS
            return min(phase, BLOCK_NS - phase)

        return min(range(FRAMES_PER_BLOCK), key=distance)


@dataclass
class SlotState:
    """One batch slot's streaming state outside the model."""

    resampler: Resampler16to24 = field(default_factory=Resampler16to24)
    block: np.ndarray = field(default_factory=lambda: np.zeros(1920, dtype=np.float32))
    fill: int = 0
    session_id: str = ""
    opened_ns: int = 0
    skip: int = 0
    ready_at_ns: int | None = None
    block_t_in_ns: int = 0
    block_resample_ns: int = 0
    frame_resample_ns: int = 0
    out_seq: int = 0
    dropped: int = 0
    audio_t_ms: float = 0.0

    def start(self, session_id: str, opened_ns: int) -> None:
        self.resampler.reset()
        self.fill = 0
        self.session_id, self.opened_ns = session_id, opened_ns
        self.skip = 0
        self.ready_at_ns = None
        self.out_seq = 0
        self.dropped = 0
        self.audio_t_ms = 0.0


class InferenceLoop:
    def __init__(self, cfg: ServerConfig, topo: Topology, engine: Engine, stop: threading.Event) -> None:
        self.engine, self.stop = engine, stop
        self.n = topo.max_sessions
        self.inputs = [attach_consumer(s) for s in topo.audio_to_inference]
        self.outputs = [attach_producer(s, topo.bell_network) for s in topo.audio_to_network]
        self.ctrl_in = attach_consumer(topo.ctrl_to_inference)
        self.ctrl_out = attach_producer(topo.ctrl_from_inference, topo.bell_network)
        self.bell = topo.bell_inference
        self.all_inputs: list[Ring] = [*self.inputs, self.ctrl_in]
        self.slots = [SlotState() for _ in range(self.n)]
        self.gens = SlotGenerations(self.n)
        self.batch = np.zeros((self.n, engine.frame_samples), dtype=np.float32)
        self.session_ids: dict[tuple[int, int], str] = {}
        wait_ms = cfg.batch_wait_ms
        if wait_ms is None:
            wait_ms = 0.0 if engine.name == "loopback" else MOSHI_BATCH_WAIT_MS
        self.policy = StepPolicy(max_wait_ns=int(wait_ms * 1e6))

    def send(self, msg: object) -> None:
        if not self.ctrl_out.try_write(encode_internal(msg)):
            log.error("control ring to network full, lost %s", type(msg).__name__)

    def run(self) -> None:
        while not self.stop.is_set():
            deadline = self.policy.next_deadline_ns([s.ready_at_ns for s in self.slots])
            timeout = IDLE_WAIT_S if deadline is None else max(0.0, (deadline - time.monotonic_ns()) / 1e9)
            wait_any(self.all_inputs, self.bell, timeout)
            self.drain_control()
            for slot in range(self.n):
                self.drain_audio(slot)
            now = time.monotonic_ns()
            open_slots = [self.gens.is_open(i) for i in range(self.n)]
            if self.policy.should_step(now, [s.ready_at_ns for s in self.slots], open_slots):
                self.step(now)

    # ---- input --------------------------------------------------------------------------------------------
    def drain_control(self) -> None:
        while (raw := self.ctrl_in.read_bytes()) is not None:
            match decode_internal(raw):
                case SessionOpen(slot=slot, gen=gen, session_id=sid):
                    self.session_ids[(slot, gen)] = sid
                case SessionClose(slot=slot, gen=gen, reason=reason):
                    st = self.slots[slot]
                    self.session_ids.pop((slot, gen), None)
                    if self.gens.close(slot, gen):
                        st.ready_at_ns = None
                        log.info("session=%s slot=%d: closed (%s)", st.session_id, slot, reason)
                case other:
                    log.warning("unexpected control message %r", other)

    def drain_audio(self, slot: int) -> None:
        ring, st = self.inputs[slot], self.slots[slot]
        backlog = ring.pending()
        if backlog > MAX_BACKLOG_FRAMES:
            for _ in range(backlog - KEEP_FRAMES):
                if ring.peek() is None:
                    break
                ring.release()
            st.dropped += backlog - KEEP_FRAMES
            log.warning("slot=%d: fell behind, dropped %d input frames", slot, backlog - KEEP_FRAMES)
        while (view := ring.peek()) is not None:
            hdr, pcm = read_in_frame(view)
            pcm = pcm.copy()
            gen, t_ns = int(hdr["gen"]), int(hdr["t_ns"])
            if not ring.release():
                st.dropped += 1
                continue
            fate = self.gens.classify(slot, gen)
            if fate is FrameFate.STALE:
                continue
            if fate is FrameFate.NEW_SESSION:
                self.open_slot(slot, gen, t_ns)
            if st.skip:
                st.skip -= 1
                continue
            self.push_frame(slot, st, pcm, t_ns)

    def open_slot(self, slot: int, gen: int, t_ns: int) -> None:
        st = self.slots[slot]
        st.start(self.session_ids.get((slot, gen), f"gen{gen}"), opened_ns=t_ns)
        self.engine.reset_slot(slot)
        others = any(self.gens.is_open(i) for i in range(self.n) if i != slot)
        st.skip = self.policy.alignment_skip(t_ns, others)
        log.info("session=%s slot=%d: started (aligning by %d frames)", st.session_id, slot, st.skip)

    def push_frame(self, slot: int, st: SlotState, pcm: np.ndarray, t_ns: int) -> None:
        t0 = time.perf_counter_ns()
        out = st.resampler.process(pcm)
        st.frame_resample_ns = time.perf_counter_ns() - t0
        st.block[st.fill : st.fill + out.shape[0]] = out
        st.fill += out.shape[0]
        if st.fill < st.block.shape[0]:
            return
        st.fill = 0
        if st.ready_at_ns is not None:  # the previous block was never stepped: drop it, keep the newest
            st.dropped += FRAMES_PER_BLOCK
        self.batch[slot] = st.block
        st.ready_at_ns = time.monotonic_ns()
        st.block_t_in_ns = t_ns
        st.block_resample_ns = st.frame_resample_ns

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self, now_ns: int) -> None:
        ready = np.array(
            [self.gens.is_open(i) and s.ready_at_ns is not None for i, s in enumerate(self.slots)]
        )
        waits_ns = [now_ns - self.slots[i].ready_at_ns for i in np.flatnonzero(ready)]
        t0 = time.monotonic_ns()
        try:
            result = self.engine.step_batch(self.batch, ready)
        except EngineOOM:
            self.on_oom()
            return
        t1 = time.monotonic_ns()
        self.policy.last_step_ns = t0
        step_ns = t1 - t0
        for slot in np.flatnonzero(ready):
            st = self.slots[slot]
            queue_ns = t0 - (st.ready_at_ns or t0)
            st.ready_at_ns = None
            if result.text[slot]:
                self.send(
                    Transcript(
                        slot=int(slot),
                        gen=self.gens.current[slot],
                        session_id=st.session_id,
                        text=result.text[slot],
                        t_ms=st.audio_t_ms,
                    )
                )
            st.audio_t_ms += 80.0
            if result.has_audio[slot]:
                self.emit(int(slot), st, result.pcm[slot], queue_ns, step_ns)
        self.send(StepStats(step_s=step_ns / 1e9, batch=int(ready.sum()), wait_s=[w / 1e9 for w in waits_ns]))

    def emit(self, slot: int, st: SlotState, pcm: np.ndarray, queue_ns: int, step_ns: int) -> None:
        t0 = time.perf_counter_ns()
        samples = float_to_int16(pcm)
        resample_us = (st.block_resample_ns + time.perf_counter_ns() - t0) // 1000
        ring = self.outputs[slot]
        for pos in range(FRAMES_PER_BLOCK):
            buf = ring.reserve()
            if buf is None:
                st.dropped += 1
                continue
            n = write_out_frame(
                buf,
                samples[pos * OUT_FRAME_SAMPLES : (pos + 1) * OUT_FRAME_SAMPLES],
                seq=st.out_seq,
                t_in_ns=st.block_t_in_ns,
                gen=self.gens.current[slot],
                block_pos=pos,
                queue_us=queue_ns // 1000,
                step_us=step_ns // 1000,
                resample_us=resample_us,
                dropped=st.dropped,
            )
            ring.publish(n)
            st.out_seq += 1

    def on_oom(self) -> None:
        """GPU memory ran out: the newest session goes (told `capacity`), the others keep running."""
        open_slots = [i for i in range(self.n) if self.gens.is_open(i)]
        if not open_slots:
            return
        newest = max(open_slots, key=lambda i: self.slots[i].opened_ns)
        st, gen = self.slots[newest], self.gens.current[newest]
        log.error("session=%s slot=%d: GPU out of memory; closing the newest session", st.session_id, newest)
        self.send(
            SlotError(
                slot=newest,
                gen=gen,
                session_id=st.session_id,
                code="capacity",
                msg="Server at capacity (GPU memory)",
            )
        )
        self.gens.close(newest, gen)
        st.ready_at_ns = None


def main(cfg: ServerConfig, topo: Topology, status: Connection) -> None:
    stop = threading.Event()
    # The stop flag is set from a signal handler; ring our own doorbell so a blocked wait returns at once.
    setup_child(cfg.log_level, lambda: (stop.set(), topo.bell_inference.ring()))
    # One torch thread on a CPU by default: measured on 2 cores, two threads stall steps for 1-2 s whenever
    # the network and VAD processes want the other core.
    threads = cfg.threads or (1 if cfg.device == "cpu" else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = load_engine(
        cfg.engine,
        checkpoint=cfg.checkpoint,
        hf_repo=cfg.hf_repo,
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=topo.max_sessions,
        log=log,
    )
    t0 = time.monotonic()
    engine.warmup()
    log.info("warm-up done in %.1f s", time.monotonic() - t0)
    loop = InferenceLoop(cfg, topo, engine, stop)
    loop.send(
        Ready(
            proc="inference",
            info={
                "model": engine.name,
                "demo_weights": "1" if engine.demo_weights else "0",
                "max_sessions": str(
                    min(topo.max_sessions, getattr(engine, "max_sessions", topo.max_sessions))
                ),
                "device": engine.device,
            },
        )
    )
    loop.run()
    log.info("inference stopped")
