"""The network process's asyncio layer: it moves bytes between the sockets, the rings and each `Session`.

uvloop + websockets. The rules live elsewhere, sans I/O: a session's in `session.py`, admission in
`slots.py`, plain HTTP in `http.py`. This layer feeds them events and carries out their actions:

* one handler task per WebSocket reads client messages into its `Session` and publishes the audio it is
  handed to the inference and VAD rings, without waiting on anyone;
* one sender task per session writes what the session has to send (control first, then model audio, then
  the close), so a slow client only ever delays itself;
* the network doorbell (`add_reader`, no thread) wakes `_on_bell`, which reads the workers' control rings
  and every live session's model audio into its `Session`;
* one ticker drives every session's clock.

Whatever way a connection ends, its handler's `finally` tells the session `connection_closed()`, so the
slot is released exactly once (by the session's `Release`) without waiting for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from procs.config import ServerConfig
from procs.frames import read_out_frame, write_in_frame
from procs.network.http import Health, HttpRoutes
from procs.network.metrics import ServerMetrics
from procs.network.session import Action, AudioOut, Close, PublishAudio, Release, Session, SessionCounters
from procs.network.slots import CAPACITY_CLOSE_CODE, CAPACITY_MESSAGE, SessionSlots, capacity_refusal
from procs.topology import NetworkLinks, Topology, network_links
from protocol import EndReason, session_start
from protocol.internal import (
    InferenceReady,
    InternalMessage,
    ModelText,
    NetworkReady,
    SessionClose,
    SessionOpen,
    SlotError,
    StepStats,
    VadReady,
    VoiceActivity,
    encode_internal,
)

log = logging.getLogger("network")

TICK_S = 0.1  # the sessions' clock: `latency` reports are due once a second, checked this often
DRAIN_TIMEOUT_S = 4.0


@dataclass(eq=False)
class LiveSession:
    """A session and the I/O that carries it out."""

    session: Session
    ws: ServerConnection
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def ctx(self) -> str:
        return f"session={self.session.session_id} slot={self.session.slot}"


class NetworkServer:
    def __init__(self, cfg: ServerConfig, topo: Topology, status: Connection) -> None:
        self.cfg, self.status = cfg, status
        self.links: NetworkLinks = network_links(topo, log)
        self.slots: SessionSlots[LiveSession] = SessionSlots(topo.max_sessions)
        self.metrics = ServerMetrics()
        self.capacity = 0  # the engine's batch size, once inference says it is ready
        self.metrics.sessions_max.set(self.capacity)
        self.ended = SessionCounters()  # what every session whose connection has closed counted
        self.closing: set[LiveSession] = set()  # released, still flushing their last messages
        self.inference: InferenceReady | None = None
        self.vad: VadReady | None = None
        self.draining = False
        self.stopped = asyncio.Event()
        self.handlers: set[asyncio.Task] = set()
        self.http = HttpRoutes(cfg.web_dir, self._health, self._render_metrics, self._websocket_refusal)

    # ---- lifecycle -----------------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self.inference is not None and self.vad is not None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.links.bell.fileno(), self._on_bell)
        ticker = asyncio.create_task(self._ticker(), name="ticker")
        try:
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
                log.info("listening on http://%s:%d (WebSocket /ws)", self.cfg.host, self.port)
                self._report_if_ready()
                await self.stopped.wait()
                await self._drain()
                server.close(close_connections=True)
                await server.wait_closed()
        finally:
            ticker.cancel()
            loop.remove_reader(self.links.bell.fileno())
        log.info("network stopped")

    def stop(self) -> None:
        self.stopped.set()

    async def _drain(self) -> None:
        """Tell every client the session is over (`session_end`, close 1001) and wait for them to go."""
        self.draining = True
        log.info("draining %d sessions", len(self.slots))
        for live in self.slots.live():
            self._apply_guarded(live, live.session.shutdown)
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=DRAIN_TIMEOUT_S)

    def _report_if_ready(self) -> None:
        if self.is_ready and hasattr(self, "port"):
            assert self.inference is not None
            self.capacity = self.inference.max_sessions
            self.metrics.sessions_max.set(self.capacity)
            ready = NetworkReady(host=self.cfg.host, port=self.port, model=self.inference.model)
            self.status.send_bytes(encode_internal(ready))
            log.info("ready: model=%s max_sessions=%d", self.inference.model, self.capacity)

    # ---- inter-process input -------------------------------------------------------------------------
    def _on_bell(self) -> None:
        self.links.bell.drain()
        for channel in self.links.from_workers:
            for msg in channel.receive():
                try:
                    self._on_internal(msg)
                except Exception:  # one bad message must not stop the others (or the loop's reader)
                    log.exception("handling %r", msg)
        for live in self.slots.live():
            ring = self.links.audio_from_inference[live.session.slot]
            while (view := ring.peek()) is not None:
                frame = read_out_frame(view)
                if ring.release():  # False: overwritten while read (counted by the ring)
                    self._apply_guarded(live, live.session.model_audio, frame)

    def _on_internal(self, msg: InternalMessage) -> None:
        match msg:
            case StepStats(step_s=step_s, wait_s=waits):
                self.metrics.step_seconds.observe(step_s)
                for wait_s in waits:
                    self.metrics.step_wait_seconds.observe(wait_s)
            case VoiceActivity(slot=slot, gen=gen, event=event, t_ms=t_ms):
                if (live := self.slots.get(slot, gen)) is not None:
                    self._apply(live, live.session.voice_activity(event, t_ms))
            case ModelText(slot=slot, gen=gen, text=text, t_ms=t_ms):
                if (live := self.slots.get(slot, gen)) is not None:
                    self._apply(live, live.session.model_text(text, t_ms))
            case SlotError(slot=slot, gen=gen, code=code, msg=text):
                if (live := self.slots.get(slot, gen)) is not None:
                    log.warning("%s: inference reports %s: %s", live.ctx(), code, text)
                    self._apply(live, live.session.slot_error(code, text))
            case InferenceReady() as ready:
                self.inference = ready
                log.info("inference ready: %s", ready)
                self._report_if_ready()
            case VadReady() as ready:
                self.vad = ready
                log.info("vad ready: %s", ready)
                self._report_if_ready()
            case _:
                log.warning("unexpected internal message %r", msg)

    # ---- carrying out a session's actions ------------------------------------------------------------
    def _apply_guarded(self, live: LiveSession, event: Callable[..., list[Action]], *args: object) -> None:
        """An event from a loop callback (the doorbell, the ticker, the drain): a failure is logged with the
        session's context and stays with that session."""
        try:
            self._apply(live, event(*args))
        except Exception:
            log.exception("%s: %s failed", live.ctx(), event.__name__)

    def _apply(self, live: LiveSession, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case PublishAudio(pcm=pcm, seq=seq, t_ns=t_ns):
                    slot, gen = live.session.slot, live.session.gen
                    for ring in (self.links.audio_to_inference[slot], self.links.audio_to_vad[slot]):
                        buf = ring.reserve()  # never None: full rings drop their oldest frame (DROP_OLDEST)
                        ring.publish(write_in_frame(buf, seq, t_ns, gen, pcm))
                case Release(reason=reason):
                    self._release(live, reason)
        if live.session.wants_to_send():
            live.wake.set()

    def _release(self, live: LiveSession, reason: EndReason) -> None:
        session = live.session
        if not self.slots.release(session.slot, session.gen):
            raise RuntimeError(f"{live.ctx()}: released twice")
        self.closing.add(live)
        close = SessionClose(slot=session.slot, gen=session.gen, reason=reason)
        self.links.to_inference.send(close)
        self.links.to_vad.send(close)
        c = session.counters
        log.info("%s: ended (%s) after %.1f s, frames in=%d out=%d, input dropped=%d realigned=%d, output "
                 "dropped=%d", live.ctx(), reason, time.monotonic() - session.started, c.frames_in,
                 c.frames_out, c.input_dropped, c.input_realigned, c.output_dropped)

    # ---- HTTP -----------------------------------------------------------------------------------------
    def _process_request(self, _conn: ServerConnection, request: Request) -> Response | None:
        return self.http.respond(request)

    def _websocket_refusal(self) -> str | None:
        if not self.is_ready:
            return "starting"
        return "draining" if self.draining else None

    def _health(self) -> Health:
        active = len(self.slots)
        if self.draining:
            state = "draining"
        elif not self.is_ready:
            state = "starting"
        elif active >= self.capacity:
            state = "full"
        else:
            state = "ok"
        return Health(
            status=state,
            sessions_active=active,
            max_sessions=self.capacity,
            model=self.inference.model if self.inference else "",
            engine=self.cfg.engine,
            demo_weights=self.inference.demo_weights if self.inference else False,
        )

    def _render_metrics(self) -> str:
        totals = SessionCounters()
        totals.add(self.ended)
        for live in [*self.slots.live(), *self.closing]:
            totals.add(live.session.counters)
        m = self.metrics
        m.sessions_active.set(len(self.slots))
        m.frames_in.set_total(totals.frames_in)
        m.frames_out.set_total(totals.frames_out)
        m.input_frames_dropped.set_total(totals.input_dropped)
        m.input_frames_realigned.set_total(totals.input_realigned)
        m.output_frames_dropped.set_total(totals.output_dropped)
        m.protocol_errors.set_total(totals.malformed)
        return m.render()

    # ---- WebSocket sessions -----------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            await self._session(ws)
        finally:
            self.handlers.discard(task)

    def _open(self, ws: ServerConnection, slot: int, gen: int) -> LiveSession:
        assert self.inference is not None
        start = session_start(uuid.uuid4().hex[:12], model=self.inference.model,
                              demo_weights=self.inference.demo_weights, max_sessions=self.capacity)
        return LiveSession(Session(start, slot, gen, now=time.monotonic()), ws)

    async def _session(self, ws: ServerConnection) -> None:
        live = self.slots.admit(self.capacity, lambda slot, gen: self._open(ws, slot, gen))
        if live is None:
            self.metrics.sessions_rejected.inc()
            log.info("refused %s: at capacity (%d sessions)", ws.remote_address, len(self.slots))
            with contextlib.suppress(ConnectionClosed):
                await ws.send(capacity_refusal())
                await ws.close(CAPACITY_CLOSE_CODE, CAPACITY_MESSAGE)
            return
        session = live.session
        sender: asyncio.Task | None = None
        try:
            ring = self.links.audio_from_inference[session.slot]
            while ring.peek() is not None:  # output left over from the slot's previous session
                ring.release()
            self.metrics.sessions_total.inc()
            open_msg = SessionOpen(slot=session.slot, gen=session.gen, session_id=session.session_id)
            self.links.to_inference.send(open_msg)
            self.links.to_vad.send(open_msg)
            log.info("%s: open from %s", live.ctx(), ws.remote_address)
            if self.draining:  # admitted in the moment before the drain began: it missed the goodbye
                self._apply(live, session.shutdown())
            live.wake.set()  # session_start
            sender = asyncio.create_task(self._sender(live), name=f"sender-{session.session_id}")
            async for message in ws:
                self._apply(live, session.receive(message, time.monotonic_ns()))
        except ConnectionClosed:
            pass
        finally:
            if sender is not None:
                sender.cancel()
            try:
                self._apply(live, session.connection_closed())
            finally:
                self.closing.discard(live)
                self.ended.add(session.counters)

    async def _sender(self, live: LiveSession) -> None:
        """The one task that writes to this client, in the order its session says."""
        session, ws = live.session, live.ws
        try:
            while True:
                item = session.next_outgoing(time.monotonic_ns())
                if item is None:
                    await live.wake.wait()
                    live.wake.clear()
                elif isinstance(item, AudioOut):
                    await ws.send(item.data)
                    if item.latency_s is not None:
                        self.metrics.frame_latency_seconds.observe(item.latency_s)
                elif isinstance(item, Close):
                    await ws.close(item.code, item.reason)
                    return
                else:
                    await ws.send(item)
        except ConnectionClosed:
            pass  # the handler sees the same close and tells the session

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)  # a period, not synchronisation
            now = time.monotonic()
            for live in self.slots.live():
                self._apply_guarded(live, live.session.tick, now)
