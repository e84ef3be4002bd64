"""Inference process: client audio from the rings -> one batched model step -> model audio to the rings.

One such process serves each inference device (`--devices`, `--inference-workers`), with its own model copy
and its own range of session slots (procs/topology.py: its `Place`); a batch row `i` of its engine is
session slot `slots[i]`. Per row it keeps an `InferenceSlot` (a streaming 16 -> 24 kHz resampler and an
80 ms block being filled); every frame in the rings is read at once, and each full block joins the row's
queue in the scheduler (procs/inference/clock.py), so a clump of frames is kept whole. When a step runs, the
oldest queued block of every row that has one takes part in one batched encode -> LM step -> decode
(`Engine.step_batch`); rows without one are masked and keep their state. Each decoded block leaves as four
20 ms frames.

The engine's batch size is the one truth about capacity: the loop serves that many slots, and says so in
its `InferenceReady`, and the network process admits exactly that many sessions to this worker.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from procs.audio.resample import Resampler16to24, float_to_int16
from procs.config import ServerConfig
from procs.frames import write_out_frame
from procs.inference.clock import Feed, ImmediateScheduler, ReadyBlock, Scheduler, StepScheduler
from procs.inference.loader import load_engine
from procs.model.engine import Engine, EngineOOM
from procs.model.torch_setup import flush_subnormals, pin_cuda_device, prepare_torch
from procs.runtime import LogThrottle, setup_child
from procs.topology import Topology, WorkerLinks, worker_links
from procs.worker import IDLE_WAIT_S, WorkerSessions
from protocol import BLOCK_MS, FRAMES_PER_BLOCK, OUT_FRAME_SAMPLES, OUT_SAMPLES_PER_BLOCK, ErrorCode
from protocol.internal import InferenceReady, ModelText, NetworkHello, SessionDetached, SlotError, StepStats
from ringbuf import Ring, wait_any

log = logging.getLogger("inference")


@dataclass(frozen=True, slots=True)
class QueuedBlock:
    """An 80 ms block of a session's audio at 24 kHz, queued for a step (the scheduler holds the queue)."""

    pcm: np.ndarray  # OUT_SAMPLES_PER_BLOCK float32
    t_in_ns: int  # when the network received its last frame
    resample_ns: int  # resampling that frame took


@dataclass(frozen=True, slots=True)
class SlotSnapshot:
    """What an `InferenceSlot` holds outside the model, at one moment (for logs, tests, a hand-over)."""

    slot: int  # the session slot
    is_open: bool
    opened_ns: int
    out_seq: int  # model frames sent so far
    dropped: int
    realigned: int
    skipped: int
    audio_t_ms: float  # the session's audio clock: steps taken x 80 ms
    block_fill: int  # samples of the next block received so far


class InferenceSlot:
    """One batch row of the engine: everything a session needs outside the model, and the model's row.

    `open` starts a session in it (its resampler, block, counters and clock, the engine's streaming state,
    the scheduler's queue, all at once); `close` ends it; `snapshot` says what it holds."""

    def __init__(self, row: int, slot: int, engine: Engine, scheduler: Scheduler[QueuedBlock]) -> None:
        self.row, self.slot = row, slot  # the engine's batch row; the session slot (messages, logs)
        self.engine, self.scheduler = engine, scheduler
        self.resampler = Resampler16to24()
        self.block = np.zeros(OUT_SAMPLES_PER_BLOCK, dtype=np.float32)
        self.is_open = False
        self._reset(0)

    def _reset(self, opened_ns: int) -> None:
        self.resampler.reset()
        self.fill = 0
        self.opened_ns = opened_ns
        self.out_seq = 0
        self.dropped = 0  # input frames this session lost: the model fell behind, or the ring overflowed
        self.realigned = 0  # input frames dropped or repeated to keep it on the step clock
        self.skipped = 0  # first frames skipped to place it on the step clock
        self.audio_t_ms = 0.0

    def open(self, opened_ns: int) -> None:
        self._reset(opened_ns)
        self.engine.reset_slot(self.row)
        self.scheduler.open(self.row)
        self.is_open = True

    def close(self) -> None:
        """The session left (or was never here): its queued blocks go, the clock may stop."""
        self.scheduler.close(self.row)
        self.is_open = False

    def push(self, pcm: np.ndarray, t_ns: int) -> QueuedBlock | None:
        """A 16 kHz frame in; the 24 kHz block it completed, if it did."""
        t0 = time.perf_counter_ns()
        out = self.resampler.process(pcm)
        resample_ns = time.perf_counter_ns() - t0
        self.block[self.fill : self.fill + out.shape[0]] = out
        self.fill += out.shape[0]
        if self.fill < self.block.shape[0]:
            return None
        self.fill = 0
        return QueuedBlock(self.block.copy(), t_in_ns=t_ns, resample_ns=resample_ns)

    def snapshot(self) -> SlotSnapshot:
        return SlotSnapshot(slot=self.slot, is_open=self.is_open, opened_ns=self.opened_ns,
                            out_seq=self.out_seq, dropped=self.dropped, realigned=self.realigned,
                            skipped=self.skipped, audio_t_ms=self.audio_t_ms, block_fill=self.fill)


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
        self.scheduler = make_scheduler(step_clock, engine.name, self.n)
        self.slots = [InferenceSlot(row, links.slots[row], engine, self.scheduler) for row in range(self.n)]
        self.sessions = WorkerSessions(links.slots[: self.n])
        self.batch = np.zeros((self.n, engine.frame_samples), dtype=np.float32)
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
                if isinstance(msg, SessionDetached):
                    self.detached(msg)
                    continue
                if (closed := self.sessions.apply(msg)) is not None:
                    slot = self.slots[closed.slot]
                    slot.close()
                    log.info("session=%s slot=%d: closed (%s)", closed.session_id, slot.slot, closed.reason)
            for row, ring in enumerate(self.audio_in):
                self.drain_audio(row, ring)
            now = time.monotonic_ns()
            if self.scheduler.should_step(now):
                blocks = [b for b in self.scheduler.take_step(now) if self.sessions.is_open(b.slot)]
                if blocks:
                    self.step(blocks)

    def announce(self) -> None:
        engine = self.engine
        self.links.control_out.send(InferenceReady(model=engine.name, demo_weights=engine.demo_weights,
                                                   max_sessions=self.n, device=engine.device))

    def detached(self, msg: SessionDetached) -> None:
        """A session lost its link and waits for a resume: its state stays; the step clock stops waiting
        for it and places it anew when its frames come again."""
        if (row := self.sessions.local(msg.slot, msg.gen)) is not None:
            self.scheduler.replace(row)
            log.info("session=%s slot=%d: detached, waiting for a resume", self.sessions.session_id(row),
                     self.slots[row].slot)

    def forget_all(self) -> None:
        """A network process (re)started: its sessions are gone; say we are ready for new ones."""
        for row in self.sessions.forget_all(self.audio_in):
            self.slots[row].close()
        log.info("a network process (re)started: every session forgotten")
        self.announce()

    # ---- input --------------------------------------------------------------------------------------------
    def drain_audio(self, row: int, ring: Ring) -> None:
        """Every frame the row's ring holds, into its blocks; complete blocks queue for a step (so a burst
        of frames is kept whole: the scheduler's queue, not the ring, is where blocks wait)."""
        slot = self.slots[row]
        for frame in self.sessions.read(row, ring):
            if frame.first:
                slot.open(frame.t_ns)
                log.info("session=%s slot=%d: started", self.sessions.session_id(row), slot.slot)
            feed = self.scheduler.frame(row, frame.seq, frame.t_ns)
            if feed is Feed.SKIP:
                slot.skipped += 1
                continue
            if feed is not Feed.ONCE:
                slot.realigned += 1
                log.debug("session=%s slot=%d: realigned to the step clock (%s a frame)",
                          self.sessions.session_id(row), slot.slot, feed.value)
            for _ in range(feed.times):
                if (block := slot.push(frame.pcm, frame.t_ns)) is not None:
                    self.queue(slot, block, frame.seq, frame.t_ns)
        slot.dropped += self.sessions.take_lost(row)

    def queue(self, slot: InferenceSlot, block: QueuedBlock, seq: int, t_ns: int) -> None:
        if self.scheduler.block_complete(slot.row, seq, t_ns, block):  # the model cannot keep up: oldest goes
            slot.dropped += FRAMES_PER_BLOCK
            held_back = self.warnings.allow(slot.row, time.monotonic())
            if held_back is not None:  # a flood must not flood the log: once per slot every 5 s
                log.warning("session=%s slot=%d: fell behind, %d input frames dropped so far (%d warnings "
                            "held back)", self.sessions.session_id(slot.row), slot.slot, slot.dropped,
                            held_back)

    # ---- the step -----------------------------------------------------------------------------------------
    def step(self, blocks: list[ReadyBlock[QueuedBlock]]) -> None:
        """`blocks`: one per ready row (the scheduler's `slot` is the engine's batch row)."""
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
            row, slot = block.slot, self.slots[block.slot]
            # The wait is counted from when the block's last frame reached the server, so what a block
            # spends queued behind a burst is in the session's `latency` figures.
            queue_ns = max(0, t0 - block.ready_ns)
            waits_ns.append(queue_ns)
            if result.text[row]:
                self.links.control_out.send(
                    ModelText(slot=slot.slot, gen=self.sessions.gen(row), text=result.text[row],
                              t_ms=slot.audio_t_ms)
                )
            slot.audio_t_ms += BLOCK_MS
            if result.has_audio[row]:
                self.emit(slot, block.payload, result.pcm[row], queue_ns, step_ns)
        self.links.control_out.send(
            StepStats(step_s=step_ns / 1e9, batch=len(blocks), wait_s=[w / 1e9 for w in waits_ns])
        )

    def emit(self, slot: InferenceSlot, block: QueuedBlock, pcm: np.ndarray, queue_ns: int,
             step_ns: int) -> None:
        t0 = time.perf_counter_ns()
        samples = float_to_int16(pcm)
        resample_us = (block.resample_ns + time.perf_counter_ns() - t0) // 1000
        ring = self.links.audio_out[slot.row]
        for pos in range(FRAMES_PER_BLOCK):
            buf = ring.reserve()  # never None: the ring drops its oldest frame instead (DROP_OLDEST)
            n = write_out_frame(
                buf,
                samples[pos * OUT_FRAME_SAMPLES : (pos + 1) * OUT_FRAME_SAMPLES],
                seq=slot.out_seq,
                t_in_ns=block.t_in_ns,
                gen=self.sessions.gen(slot.row),
                block_pos=pos,
                queue_us=queue_ns // 1000,
                step_us=step_ns // 1000,
                resample_us=resample_us,
                dropped=slot.dropped,
                realigned=slot.realigned,
                skipped=slot.skipped,
            )
            ring.publish(n)
            slot.out_seq += 1

    def on_oom(self) -> None:
        """GPU memory ran out: the newest session goes (told `capacity`), the others keep running."""
        open_rows = [row for row in range(self.n) if self.sessions.is_open(row)]
        if not open_rows:
            return
        newest = self.slots[max(open_rows, key=lambda row: self.slots[row].opened_ns)]
        gen = self.sessions.gen(newest.row)
        log.error("session=%s slot=%d: GPU out of memory; closing the newest session",
                  self.sessions.session_id(newest.row), newest.slot)
        self.links.control_out.send(
            SlotError(slot=newest.slot, gen=gen, code=ErrorCode.CAPACITY,
                      msg="Server at capacity (GPU memory)")
        )
        self.sessions.close(newest.row)
        newest.close()


def main(cfg: ServerConfig, topo: Topology, name: str, status: Connection) -> None:
    """The inference worker at place `name` of the topology: its device and its slots."""
    stop = threading.Event()
    place = topo.place(name)
    # The stop flag is set from a signal handler; ring our own doorbell so a blocked wait returns at once.
    setup_child(cfg.log_level, lambda: (stop.set(), place.bell.ring()), log_format=cfg.log_format)
    assert place.device is not None
    device = pin_cuda_device(place.device)  # before anything touches CUDA in this process
    prepare_torch(device)  # before load_engine imports moshi
    flush_subnormals(device)
    # One torch thread on a CPU by default: measured on 2 cores, two threads stall steps for 1-2 s whenever
    # the network and VAD processes want the other core.
    threads = cfg.threads or (1 if device == "cpu" else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = load_engine(
        cfg.engine,
        source=cfg.model,
        device=device,
        dtype=cfg.dtype,
        batch_size=len(place.slots),
        log=log,
        footprint=cfg.footprint,
        session_memory_bytes=None if cfg.session_memory_mb is None else int(cfg.session_memory_mb * 2**20),
        card_memory_bytes=None if cfg.gpu_memory_gb is None else int(cfg.gpu_memory_gb * 1e9),
        gpu_memory_fraction=cfg.gpu_memory_fraction,
    )
    t0 = time.monotonic()
    engine.warmup()
    log.info("%s on %s: warm-up done in %.1f s (session slots %d-%d)", name, place.device,
             time.monotonic() - t0, place.slots.start, place.slots.stop - 1)
    loop = InferenceLoop(worker_links(topo, name, log), engine, stop, cfg.step_clock)
    loop.forget_all()  # a restarted process: whatever is queued belongs to sessions that were ended
    loop.run()
    log.info("%s stopped", name)
