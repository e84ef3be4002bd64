"""Network process: browsers' WebSockets on one side, the shared-memory rings on the other.

uvloop + websockets. Every client message is decoded by `protocol/` (the one place that validates bytes
from the network); audio goes into two rings (inference, VAD) without waiting on anyone, and model audio
comes back through a ring whose doorbell the event loop watches with `add_reader`, so no thread is needed
and a slow client only ever delays its own sender task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import msgspec
import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from procs.config import ServerConfig
from procs.frames import read_out_frame, write_in_frame
from procs.network.metrics import ServerMetrics
from procs.topology import Topology, attach_consumer, attach_producer
from protocol import (
    ClientSessionEnd,
    Error,
    ErrorCode,
    LatencyBreakdown,
    Ping,
    Pong,
    ProtocolError,
    SessionEnd,
    decode_client,
    encode_server_audio,
    encode_server_control,
    session_start,
)
from protocol import Latency as LatencyMsg
from protocol import Transcript as TranscriptMsg
from protocol import Vad as VadMsg
from protocol.internal import (
    Ready,
    SessionClose,
    SessionOpen,
    SlotError,
    StepStats,
    Transcript,
    VadEvent,
    decode_internal,
    encode_internal,
)
from ringbuf import Ring

log = logging.getLogger("network")

WS_PATH = "/ws"
# A client that sends this many malformed messages within GARBAGE_WINDOW_S is closed with 1008; fewer are
# answered with an `error` each (at most ERRORS_PER_SECOND of them) and the session goes on.
GARBAGE_LIMIT = 50
GARBAGE_WINDOW_S = 10.0
ERRORS_PER_SECOND = 10
LATENCY_PERIOD_S = 1.0
DRAIN_TIMEOUT_S = 4.0


@dataclass
class LatencyWindow:
    """Server-added latency samples of one session since its last `latency` message."""

    total_ms: list[float] = field(default_factory=list)
    queue_ms: float = 0.0
    step_ms: float = 0.0
    resample_ms: float = 0.0
    last: LatencyMsg | None = None

    def add(self, total_ms: float, queue_ms: float, step_ms: float, resample_ms: float) -> None:
        self.total_ms.append(total_ms)
        self.queue_ms += queue_ms
        self.step_ms += step_ms
        self.resample_ms += resample_ms

    def flush(self, dropped: int, window_s: float) -> LatencyMsg | None:
        n = len(self.total_ms)
        if n == 0:
            return self.last
        ms = float(np.median(self.total_ms))
        queue, step, resample = self.queue_ms / n, self.step_ms / n, self.resample_ms / n
        msg = LatencyMsg(
            ms=ms,
            breakdown=LatencyBreakdown(
                queue_ms=queue,
                step_ms=step,
                resample_ms=resample,
                transport_ms=max(0.0, float(np.mean(self.total_ms)) - queue - step - resample),
            ),
            p99_ms=float(np.percentile(self.total_ms, 99)),
            dropped_frames=dropped,
            window_s=window_s,
        )
        self.total_ms.clear()
        self.queue_ms = self.step_ms = self.resample_ms = 0.0
        self.last = msg
        return msg


@dataclass
class Session:
    session_id: str
    slot: int
    gen: int
    ws: ServerConnection
    to_inference: Ring
    to_vad: Ring
    from_inference: Ring
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    outbox: deque[str] = field(default_factory=deque)  # control messages, sent before queued audio
    close_code: int | None = None
    close_reason: str = ""
    seq_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    garbage: deque[float] = field(default_factory=deque)
    errors_sent: deque[float] = field(default_factory=deque)
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    started: float = field(default_factory=time.monotonic)

    def say(self, msg: msgspec.Struct) -> None:
        self.outbox.append(encode_server_control(msg))
        self.wake.set()

    def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.wake.set()

    def ctx(self) -> str:
        return f"session={self.session_id} slot={self.slot}"


class SessionSlots:
    """Which batch slot each live session holds, and each slot's generation counter."""

    def __init__(self, n: int) -> None:
        self._free = list(range(n - 1, -1, -1))
        self._gen = [0] * n
        self.by_slot: dict[int, Session] = {}

    def acquire(self, limit: int) -> tuple[int, int] | None:
        if not self._free or len(self.by_slot) >= limit:
            return None
        slot = self._free.pop()
        self._gen[slot] += 1
        return slot, self._gen[slot]

    def release(self, slot: int) -> None:
        self.by_slot.pop(slot, None)
        self._free.append(slot)

    def get(self, slot: int, gen: int) -> Session | None:
        s = self.by_slot.get(slot)
        return s if s is not None and s.gen == gen else None


class NetworkServer:
    def __init__(self, cfg: ServerConfig, topo: Topology, status: Connection) -> None:
        self.cfg, self.topo, self.status = cfg, topo, status
        bell_inf, bell_vad = topo.bell_inference, topo.bell_vad
        self.to_inference = [attach_producer(s, bell_inf) for s in topo.audio_to_inference]
        self.to_vad = [attach_producer(s, bell_vad) for s in topo.audio_to_vad]
        self.from_inference = [attach_consumer(s) for s in topo.audio_to_network]
        self.ctrl_to_inference = attach_producer(topo.ctrl_to_inference, bell_inf)
        self.ctrl_to_vad = attach_producer(topo.ctrl_to_vad, bell_vad)
        self.ctrl_in = [attach_consumer(topo.ctrl_from_inference), attach_consumer(topo.ctrl_from_vad)]
        self.bell = topo.bell_network
        self.slots = SessionSlots(topo.max_sessions)
        self.metrics = ServerMetrics()
        self.metrics.sessions_max.set(topo.max_sessions)
        self.capacity = topo.max_sessions
        self.ready: dict[str, dict[str, str]] = {}
        self.draining = False
        self.stopped = asyncio.Event()
        self.handlers: set[asyncio.Task] = set()
        self.web_dir = cfg.web_dir.resolve()

    # ---- lifecycle -----------------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return "inference" in self.ready and "vad" in self.ready

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.bell.fileno(), self._on_bell)
        async with serve(
            self._handle,
            self.cfg.host,
            self.cfg.port,
            process_request=self._process_request,
            compression=None,  # per-message deflate costs CPU and latency on incompressible PCM
            max_size=64 * 1024,
            max_queue=64,
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            log.info("listening on http://%s:%d (WebSocket %s)", self.cfg.host, self.port, WS_PATH)
            self._report_if_ready()
            await self.stopped.wait()
            await self._drain()
            server.close(close_connections=True)
            await server.wait_closed()
        loop.remove_reader(self.bell.fileno())
        log.info("network stopped")

    def stop(self) -> None:
        self.stopped.set()

    async def _drain(self) -> None:
        """Tell every client the session is over (`session_end`, close 1001) and wait for them to go."""
        self.draining = True
        log.info("draining %d sessions", len(self.slots.by_slot))
        for s in list(self.slots.by_slot.values()):
            s.say(SessionEnd(reason="server_shutdown", frames_in=s.seq_in, frames_out=s.frames_out))
            s.close(1001, "server shutting down")
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=DRAIN_TIMEOUT_S)

    def _report_if_ready(self) -> None:
        if self.is_ready and hasattr(self, "port"):
            info = self.ready["inference"]
            self.capacity = min(self.topo.max_sessions, int(info.get("max_sessions", self.topo.max_sessions)))
            self.metrics.sessions_max.set(self.capacity)
            self.status.send(("ready", {"host": self.cfg.host, "port": self.port, **info}))
            log.info("ready: model=%s max_sessions=%d", info.get("model", "?"), self.capacity)

    # ---- inter-process input -------------------------------------------------------------------------
    def _on_bell(self) -> None:
        self.bell.drain()
        for ring in self.ctrl_in:
            while (raw := ring.read_bytes()) is not None:
                self._on_internal(raw)
        for s in self.slots.by_slot.values():
            if s.from_inference.pending():
                s.wake.set()

    def _on_internal(self, raw: bytes) -> None:
        try:
            msg = decode_internal(raw)
        except (ProtocolError, ValueError):
            log.exception("undecodable internal message (%d bytes)", len(raw))
            return
        match msg:
            case StepStats(step_s=step_s, wait_s=waits):
                self.metrics.step_seconds.observe(step_s)
                for w in waits:
                    self.metrics.step_wait_seconds.observe(w)
            case VadEvent(slot=slot, gen=gen, event=event, t_ms=t_ms):
                if (s := self.slots.get(slot, gen)) is not None:
                    s.say(VadMsg(event=event, t_ms=t_ms))
            case Transcript(slot=slot, gen=gen, text=text, t_ms=t_ms):
                if (s := self.slots.get(slot, gen)) is not None:
                    s.say(TranscriptMsg(text=text, t_ms=t_ms))
            case SlotError(slot=slot, gen=gen, code=code, msg=text):
                if (s := self.slots.get(slot, gen)) is not None:
                    log.warning("%s: inference reports %s: %s", s.ctx(), code, text)
                    s.say(Error(code=ErrorCode(code), msg=text, fatal=code == ErrorCode.CAPACITY.value))
                    if code == ErrorCode.CAPACITY.value:
                        s.close(1013, "Server at capacity")
            case Ready(proc=proc, info=info):
                self.ready[proc] = info
                log.info("%s ready: %s", proc, info)
                self._report_if_ready()
            case _:
                log.warning("unexpected internal message %r", msg)

    def _send_ctrl(self, msg: msgspec.Struct) -> None:
        raw = encode_internal(msg)
        for ring in (self.ctrl_to_inference, self.ctrl_to_vad):
            if not ring.try_write(raw):
                log.error("control ring full, lost %s", type(msg).__name__)

    # ---- HTTP -----------------------------------------------------------------------------------------
    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            if not self.is_ready or self.draining:
                return conn.respond(503, "starting\n" if not self.is_ready else "draining\n")
            return None
        if path == "/health":
            return self._health(conn)
        if path == "/metrics":
            self._refresh_gauges()
            return _respond(conn, 200, self.metrics.render().encode(), "text/plain; version=0.0.4")
        return self._static(conn, path)

    def _health(self, conn: ServerConnection) -> Response:
        active = len(self.slots.by_slot)
        if self.draining:
            state = "draining"
        elif not self.is_ready:
            state = "starting"
        elif active >= self.capacity:
            state = "full"
        else:
            state = "ok"
        info = self.ready.get("inference", {})
        body = msgspec.json.encode(
            {
                "status": state,
                "sessions_active": active,
                "max_sessions": self.capacity,
                "model": info.get("model", ""),
                "engine": self.cfg.engine,
                "demo_weights": info.get("demo_weights", "") == "1",
            }
        )
        return _respond(conn, 200 if state == "ok" else 503, body, "application/json")

    def _static(self, conn: ServerConnection, path: str) -> Response:
        rel = "index.html" if path in ("", "/") else path.lstrip("/")
        target = (self.web_dir / rel).resolve()
        if not target.is_relative_to(self.web_dir) or not target.is_file():
            return _respond(conn, 404, b"not found\n", "text/plain")
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix in (".js", ".mjs"):
            ctype = "text/javascript"
        return _respond(conn, 200, target.read_bytes(), ctype, cache="no-cache")

    def _refresh_gauges(self) -> None:
        self.metrics.sessions_active.set(len(self.slots.by_slot))

    # ---- WebSocket sessions -----------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self._session(ws)
        finally:
            self.handlers.discard(task)

    async def _session(self, ws: ServerConnection) -> None:
        got = self.slots.acquire(self.capacity)
        if got is None:
            self.metrics.sessions_rejected.inc()
            log.info("refused %s: at capacity (%d sessions)", ws.remote_address, len(self.slots.by_slot))
            with contextlib.suppress(ConnectionClosed):
                await ws.send(
                    encode_server_control(
                        Error(code=ErrorCode.CAPACITY, msg="Server at capacity", fatal=True)
                    )
                )
                await ws.close(1013, "Server at capacity")
            return
        slot, gen = got
        s = Session(
            session_id=uuid.uuid4().hex[:12],
            slot=slot,
            gen=gen,
            ws=ws,
            to_inference=self.to_inference[slot],
            to_vad=self.to_vad[slot],
            from_inference=self.from_inference[slot],
        )
        # Output left over from the slot's previous session is worthless now.
        while s.from_inference.peek() is not None:
            s.from_inference.release()
        self.slots.by_slot[slot] = s
        self.metrics.sessions_total.inc()
        self._send_ctrl(SessionOpen(slot=slot, gen=gen, session_id=s.session_id, t_ns=time.monotonic_ns()))
        info = self.ready.get("inference", {})
        s.say(
            session_start(
                s.session_id,
                model=info.get("model", ""),
                demo_weights=info.get("demo_weights", "") == "1",
                max_sessions=self.capacity,
            )
        )
        log.info("%s: open from %s", s.ctx(), ws.remote_address)
        sender = asyncio.create_task(self._sender(s), name=f"sender-{s.session_id}")
        ticker = asyncio.create_task(self._ticker(s), name=f"ticker-{s.session_id}")
        reason = "client_closed"
        try:
            async for message in ws:
                if self._on_client_message(s, message):
                    reason = "client_request"
                    s.say(SessionEnd(reason=reason, frames_in=s.seq_in, frames_out=s.frames_out))
                    s.close(1000, "session ended")
                if s.close_code is not None:
                    break
            await sender
        except ConnectionClosed:
            pass
        finally:
            ticker.cancel()
            sender.cancel()
            self.slots.release(slot)
            self._send_ctrl(SessionClose(slot=slot, gen=gen, session_id=s.session_id, reason=reason))
            log.info(
                "%s: closed (%s) after %.1f s, frames in=%d out=%d dropped=%d",
                s.ctx(),
                s.close_reason or reason,
                time.monotonic() - s.started,
                s.seq_in,
                s.frames_out,
                s.dropped,
            )

    def _on_client_message(self, s: Session, message: str | bytes) -> bool:
        """Handle one client message without blocking. True when the client asked to end the session."""
        try:
            decoded = decode_client(message)
        except ProtocolError as e:
            self._on_garbage(s, e)
            return False
        if isinstance(decoded, memoryview):
            t_ns = time.monotonic_ns()
            for ring in (s.to_inference, s.to_vad):
                buf = ring.reserve()
                if buf is None:
                    s.dropped += 1
                    self.metrics.frames_dropped.inc()
                    continue
                ring.publish(write_in_frame(buf, s.seq_in, t_ns, s.gen, decoded))
            s.seq_in += 1
            self.metrics.frames_in.inc()
            return False
        match decoded:
            case Ping(id=i, t_ms=t):
                s.say(Pong(id=i, t_ms=t))
            case Pong():
                pass
            case ClientSessionEnd():
                return True
        return False

    def _on_garbage(self, s: Session, e: ProtocolError) -> None:
        self.metrics.protocol_errors.inc()
        now = time.monotonic()
        _trim(s.garbage, now - GARBAGE_WINDOW_S)
        s.garbage.append(now)
        if len(s.garbage) >= GARBAGE_LIMIT:
            log.warning(
                "%s: %d malformed messages in %.0f s, closing", s.ctx(), len(s.garbage), GARBAGE_WINDOW_S
            )
            s.say(Error(code=e.code, msg=f"too many malformed messages: {e.msg}", fatal=True))
            s.close(1008, "too many malformed messages")
            return
        _trim(s.errors_sent, now - 1.0)
        if len(s.errors_sent) < ERRORS_PER_SECOND:
            s.errors_sent.append(now)
            s.say(e.to_message())

    async def _sender(self, s: Session) -> None:
        """The one task that writes to this client: control messages first, then model audio."""
        ws, ring = s.ws, s.from_inference
        while True:
            await s.wake.wait()
            s.wake.clear()
            while s.outbox:
                await ws.send(s.outbox.popleft())
            while (view := ring.peek()) is not None:
                hdr, pcm = read_out_frame(view)
                frame = encode_server_audio(pcm)
                gen, pos, t_in = int(hdr["gen"]), int(hdr["block_pos"]), int(hdr["t_in_ns"])
                queue_us, step_us, resample_us = (
                    int(hdr["queue_us"]),
                    int(hdr["step_us"]),
                    int(hdr["resample_us"]),
                )
                dropped = int(hdr["dropped"])
                if not ring.release() or gen != s.gen:
                    continue  # overwritten while read (counted by the ring), or a previous session's
                await ws.send(frame)
                s.frames_out += 1
                self.metrics.frames_out.inc()
                if dropped > s.dropped:
                    self.metrics.frames_dropped.inc(dropped - s.dropped)
                    s.dropped = dropped
                if pos == 0:
                    total_s = (time.monotonic_ns() - t_in) / 1e9
                    self.metrics.frame_latency_seconds.observe(total_s)
                    s.latency.add(total_s * 1e3, queue_us / 1e3, step_us / 1e3, resample_us / 1e3)
            if s.close_code is not None:
                await ws.close(s.close_code, s.close_reason)
                return

    async def _ticker(self, s: Session) -> None:
        """At least one `latency` message a second, as long as the session has produced audio."""
        while True:
            await asyncio.sleep(LATENCY_PERIOD_S)  # a period, not synchronisation
            msg = s.latency.flush(s.dropped, LATENCY_PERIOD_S)
            if msg is not None:
                s.say(msg)


def _trim(times: deque[float], before: float) -> None:
    while times and times[0] < before:
        times.popleft()


def _respond(
    conn: ServerConnection, status: int, body: bytes, ctype: str, cache: str = "no-store"
) -> Response:
    resp = conn.respond(status, "")
    del resp.headers["Content-Type"]
    del resp.headers["Content-Length"]
    resp.headers["Content-Type"] = _charset(ctype)
    resp.headers["Content-Length"] = str(len(body))
    resp.headers["Cache-Control"] = cache
    resp.body = body
    return resp


def _charset(ctype: str) -> str:
    """Text types say they are UTF-8; others are left as they are."""
    return f"{ctype}; charset=utf-8" if ctype.startswith(("text/", "application/json")) else ctype
