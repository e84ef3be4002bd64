"""The network process's asyncio layer: it moves bytes between the sockets, the rings and each `Session`.

uvloop + websockets. The rules live elsewhere, sans I/O: a session's in `session.py`, each wire's bytes in
its edge (`wires.py` for `/ws`, `moshi_api.py` for `/api/chat`), admission in `slots.py`, plain HTTP in
`http.py`. This layer feeds them events and carries out their actions:

* one handler task per WebSocket reads client messages through its wire's edge into its `Session` and
  publishes the audio it is handed to the inference and VAD rings, without waiting on anyone;
* one sender task per session drains the session's outbox through the same edge (control first, then model
  audio, then the close; quality reports into the metrics), so a slow client only ever delays itself;
* the network doorbell (`add_reader`, no thread) wakes `_on_bell`, which reads the workers' control rings
  and every live session's model audio into its `Session`;
* a new session goes to the inference worker with the most free slots (procs/network/workers.py); one
  worker going down ends only the sessions in its slots;
* one ticker drives every session's clock.

Whatever way a connection ends, its handler's `finally` tells the session `connection_closed()` (unless a
resume took the session to another connection meanwhile), so the slot is released exactly once (by the
session's `Release`) without waiting for anything else; a detached session's `Release` comes from its
clock (the ticker) when its window passes.

A session outlives its connection when the link drops (`--resume-window`, procs/network/resume.py): its
`LiveSession` keeps the slot with no `Link` (DETACHED) until `/ws?resume=TOKEN` gives it a new one, or its
window passes (the ticker). A resume whose session still has a link (a half-dead one the server has not
noticed) takes the session over: the old connection is closed with CLOSE_RESUMED_ELSEWHERE and its handler,
no longer the session's link, leaves the session alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import CONNECTING
from websockets.server import ServerProtocol

from procs.config import ServerConfig, server_tls_context
from procs.fdlimit import room_for_a_session, soft_limit
from procs.frames import read_out_frame, write_in_frame
from procs.network.agent import AgentServer, health_reply
from procs.network.auth import Access
from procs.network.codec import requested_codec
from procs.network.hosts import AllowedHosts, bound_hosts
from procs.network.http import (
    MISDIRECTED,
    MOSHI_PATH,
    UNREAD_BODY_PREFIX,
    Health,
    HttpRoutes,
    WorkerHealth,
    internal_error,
)
from procs.network.metrics import ServerMetrics
from procs.network.moshi_api import MoshiAdapter, moshi_params
from procs.network.moshi_api import capacity_refusal as moshi_capacity_refusal
from procs.network.quality import QualityReport
from procs.network.resume import REFUSAL_MESSAGES, ResumeRefusal, TokenBook, requested_resume
from procs.network.session import (
    CLOSE_CODES,
    Action,
    Close,
    Phase,
    PublishAudio,
    Release,
    Session,
    SessionCounters,
    SessionRules,
)
from procs.network.slots import CAPACITY_MESSAGE, SessionSlots, capacity_refusal
from procs.network.wires import AudioOut, Wire, WireOutgoing, ws_wire
from procs.network.workers import InferenceWorkers
from procs.runtime import LogThrottle
from procs.topology import NetworkLinks, Topology, network_links
from protocol import (
    CLOSE_RECONNECTING,
    CLOSE_RESUMED_ELSEWHERE,
    MAX_TEXT_BYTES,
    ClientStats,
    EndReason,
    Error,
    ErrorCode,
    SessionStart,
    session_start,
)
from protocol.internal import (
    InferenceReady,
    InternalMessage,
    ModelText,
    NetworkHello,
    NetworkReady,
    SessionClose,
    SessionDetached,
    SessionOpen,
    SlotError,
    StepStats,
    VadReady,
    VoiceActivity,
    WorkerDown,
    encode_internal,
)

log = logging.getLogger("network")

TICK_S = 0.1  # the sessions' clock: `latency` reports are due once a second, checked this often
GOODBYE_S = 2.0  # how long closing clients get to take their `session_end` and close before we abort
RESUMED_ELSEWHERE = "resumed elsewhere"  # the close reason of a connection a resume took its session from
OPEN_TIMEOUT_S = 5.0  # the opening handshake (request line to 101) must complete within this
SEND_BUFFER_BYTES = 16 * 1024  # per connection: audio waits in our bounded queue, not in the kernel
WRITE_LIMIT = (4096, 1024)  # websockets' transport buffer high/low-water marks, likewise


@dataclass(eq=False)
class Link:
    """One WebSocket carrying a session: a session has one at a time, none while detached."""

    ws: ServerConnection
    wire: Wire  # the session's edge: our `/ws` (PCM or Opus) or moshi.server's `/api/chat`
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # A resumed link: the token it came with stays good until the client speaks on it (procs/network/
    # resume.py: `confirm`), which shows the client has the new one.
    unconfirmed: bool = False

    # The session's I/O, through its wire's edge: decoded on the way in, encoded on the way out.
    def receive(self, message: str | bytes, now_ns: int) -> list[Action]:
        return self.wire.receive(message, now_ns)

    def next_outgoing(self, now_ns: int) -> WireOutgoing | None:
        return self.wire.next_outgoing(now_ns)

    def wants_to_send(self) -> bool:
        return self.wire.wants_to_send()


@dataclass(eq=False)
class LiveSession:
    """A session holding a slot, and the connection that carries it (None while it waits for a resume)."""

    session: Session
    link: Link | None
    rate_limited_logged: int = 0
    warnings: tuple[str, ...] = ()  # the quality warnings of its last report (logged when they change)
    client_stats_observed: ClientStats | None = None  # the page's figures last put into the histograms

    def ctx(self) -> tuple[str, int]:
        """For a log template that starts `session=%s slot=%d` (procs/runtime.py: SessionContext)."""
        return self.session.session_id, self.session.slot

    @property
    def key(self) -> tuple[int, int]:
        """Its slot and generation: what its resume token names."""
        return self.session.slot, self.session.gen


class NetworkServer:
    def __init__(self, cfg: ServerConfig, topo: Topology, status: Connection) -> None:
        self.cfg, self.status = cfg, status
        self.links: NetworkLinks = network_links(topo, log)
        self.slots: SessionSlots[LiveSession] = SessionSlots(topo.max_sessions)
        # One ready record per inference worker; a stalled one is told by its heartbeat on the board.
        board = self.links.heartbeat.board
        self.inference = InferenceWorkers(topo.inference, last_beat=lambda place: board.get(place.beat))
        self.metrics = ServerMetrics([w.name for w in self.inference], [r.value for r in ResumeRefusal])
        # The resume token of every resumable session; a restarted network process draws a new server id,
        # so the tokens of the one before are "foreign" (their sessions are gone with it).
        self.tokens: TokenBook[tuple[int, int]] = TokenBook()
        self.closers: set[asyncio.Task] = set()  # closing connections whose session was resumed elsewhere
        self.ended = SessionCounters()  # what every session whose connection has closed counted
        self.closing: set[LiveSession] = set()  # released, still flushing their last messages
        self.vad: VadReady | None = None
        self.reported_ready = False
        self.draining = False
        self.stop_now = asyncio.Event()  # SIGUSR1, a second SIGTERM: say goodbye at once
        self.drain_requested = asyncio.Event()  # SIGTERM: let conversations finish, then stop
        self.no_sessions = asyncio.Event()  # set when the last session ends (the drain waits for it)
        self.handlers: set[asyncio.Task] = set()
        self.rules = SessionRules.of(cfg)
        access = Access(cfg.allowed_origins, cfg.auth_token, cfg.auth_secret)
        # The Host headers served (DNS rebinding, procs/network/hosts.py): what the server is bound to, and
        # what the operator adds. Looked up once here; a wildcard bind looks up the machine's names.
        hosts = AllowedHosts.of((*bound_hosts(cfg.host), *cfg.allowed_hosts))
        log.info("serving the Host names %s", "any (--allowed-hosts *)" if hosts.any_host else hosts)
        self.http = HttpRoutes(cfg.web_dir, self._health, self._render_metrics, self._websocket_refusal,
                               access, hosts)
        self.warnings = LogThrottle(period_s=5.0)
        # https:// and wss:// with `--ssl-cert`/`--ssl-key` (or `--ssl DIR`): the microphone needs a secure
        # page anywhere but localhost. None: plain http:// and ws://.
        self.tls = (None if cfg.ssl_cert is None or cfg.ssl_key is None
                    else server_tls_context(cfg.ssl_cert, cfg.ssl_key))
        # HAProxy's agent check (`--agent-port`): the weight and UP/DOWN from the same state as /health.
        self.agent = (AgentServer(cfg.host, cfg.agent_port, lambda: health_reply(self._health()))
                      if cfg.agent_port is not None else None)

    # ---- lifecycle -----------------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        """Sessions can be admitted: the VAD and at least one inference worker are ready."""
        return self.inference.any_ready and self.vad is not None

    @property
    def capacity(self) -> int:
        """Sessions the server holds now: those live, and the free slots of its ready inference workers that
        are not stalled (procs/network/workers.py). With every worker ready: the sum of their batch sizes."""
        return len(self.slots) + self.inference.free(self.slots.count, time.monotonic_ns())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.links.bell.fileno(), self._on_bell)
        ticker = asyncio.create_task(self._ticker(), name="ticker")
        # A restarted network process: the workers forget the sessions of the one before and say they are
        # ready (at the first start they say so anyway).
        for worker in self.links.workers.values():
            worker.to.send(NetworkHello())
        try:
            async with serve(
                self._handle,
                self.cfg.host,
                self.cfg.port,
                process_request=self._process_request,
                create_connection=HttpConnection,
                compression=None,  # per-message deflate costs CPU and latency on incompressible PCM
                max_size=MAX_TEXT_BYTES,  # the largest legal message; the library refuses more with 1009
                max_queue=64,
                write_limit=WRITE_LIMIT,
                close_timeout=GOODBYE_S,
                # A connection still in its opening handshake when the server stops is waited for (the
                # library's close waits on every handler) this long at most.
                open_timeout=OPEN_TIMEOUT_S,
                ssl=self.tls,  # None: plain http:// and ws://
            ) as server:
                if self.agent is not None:  # before `port` is set: READY tells both ports
                    await self.agent.start()
                self.port = server.sockets[0].getsockname()[1]
                scheme = "http" if self.tls is None else "https"
                log.info("listening on %s://%s:%d (WebSocket /ws)", scheme, self.cfg.host, self.port)
                self._report_if_ready()
                await self._wait_for_stop()
                await self._goodbye()
                server.close(close_connections=False)
                await server.wait_closed()
        finally:
            if self.agent is not None:  # after the WebSockets: HAProxy hears "draining" until the end
                await self.agent.close()
            ticker.cancel()
            loop.remove_reader(self.links.bell.fileno())
        log.info("network stopped")

    def request_stop(self, drain: bool) -> None:
        """From the signal relay: drain (let conversations finish), or stop at once."""
        (self.drain_requested if drain else self.stop_now).set()

    async def _wait_for_stop(self) -> None:
        """Until a stop is asked for; a drain first stops new sessions and lets live ones go on until they
        end or `--drain-timeout` passes (a stop-now request cuts it short)."""
        asked = [asyncio.create_task(e.wait()) for e in (self.drain_requested, self.stop_now)]
        await asyncio.wait(asked, return_when=asyncio.FIRST_COMPLETED)
        if self.stop_now.is_set():
            for task in asked:
                task.cancel()
            return
        self.draining = True
        deadline_s = self.cfg.drain_timeout_s
        log.info("draining: %d sessions may go on for up to %.0f s; no new sessions", len(self.slots),
                 deadline_s)
        for live in self.slots.live():
            self._apply_guarded(live, live.session.drain, deadline_s)
        if not len(self.slots):
            self.no_sessions.set()
        done = asyncio.create_task(self.no_sessions.wait())
        await asyncio.wait([done, asked[1]], timeout=deadline_s, return_when=asyncio.FIRST_COMPLETED)
        for task in (done, *asked):
            task.cancel()
        log.info("drain over: %d sessions still open", len(self.slots))

    async def _goodbye(self) -> None:
        """Every remaining client is told the session is over (`session_end`, close 1001) and gets
        GOODBYE_S to take it; a client that cannot (it stopped reading) is cut off, so the stop never
        waits on a client."""
        self.draining = True
        for live in self.slots.live():
            self._apply_guarded(live, live.session.shutdown)
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=GOODBYE_S)
        for live in [*self.slots.live(), *self.closing]:
            transport = None if live.link is None else live.link.ws.transport
            if transport is not None and not transport.is_closing():
                log.warning("session=%s slot=%d: could not take its goodbye within %.0f s; aborting the "
                            "connection", *live.ctx(), GOODBYE_S)
                transport.abort()
        if self.handlers:
            await asyncio.wait(self.handlers, timeout=GOODBYE_S)

    def _report_if_ready(self) -> None:
        """Tell the supervisor once each time every worker is ready (at start, after a worker restart)."""
        model = self.inference.first_ready
        if (self.inference.all_ready and self.vad is not None and model is not None and hasattr(self, "port")
                and not self.reported_ready):
            self.reported_ready = True
            ready = NetworkReady(host=self.cfg.host, port=self.port, model=model.model,
                                 agent_port=None if self.agent is None else self.agent.port)
            self.status.send_bytes(encode_internal(ready))
            log.info("ready: model=%s max_sessions=%d (%s)", model.model, self.capacity,
                     ", ".join(f"{w.name}: {w.capacity}" for w in self.inference))

    # ---- inter-process input -------------------------------------------------------------------------
    def _on_bell(self) -> None:
        self.links.bell.drain()
        # The supervisor's first: a `WorkerDown` queued before a restarted worker's `InferenceReady` in the
        # same batch must be handled before it, not after (which would leave that worker "starting").
        channels = [("supervisor", self.links.from_supervisor),
                    *((name, w.came_from) for name, w in self.links.workers.items())]
        for source, channel in channels:
            for msg in channel.receive():
                try:
                    self._on_internal(msg, source)
                except Exception:  # one bad message must not stop the others (or the loop's reader)
                    log.exception("handling %r from %s", msg, source)
        for live in self.slots.live():
            ring = self.links.audio_from_inference[live.session.slot]
            while (view := ring.peek()) is not None:
                frame = read_out_frame(view)
                if ring.release():  # False: overwritten while read (counted by the ring)
                    self._apply_guarded(live, live.session.model_audio, frame)

    def _on_internal(self, msg: InternalMessage, source: str) -> None:
        """One message from `source`: "supervisor" or a worker's place name."""
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
                    log.warning("session=%s slot=%d: inference reports %s: %s", *live.ctx(), code, text)
                    self._apply(live, live.session.slot_error(code, text))
            case InferenceReady() as ready if (worker := self.inference.get(source)) is not None:
                worker.ready = ready
                log.info("%s ready: %s", source, ready)
                self._report_if_ready()
            case VadReady() as ready:
                self.vad = ready
                log.info("vad ready: %s", ready)
                self._report_if_ready()
            case WorkerDown(worker=name, why=why) if (worker := self.inference.get(name)) is not None:
                ended = [live for live in self.slots.live() if live.session.slot in worker.place.slots]
                log.error("%s is down (%s): ending its %d sessions; %d go on with the other workers", name,
                          why, len(ended), len(self.slots) - len(ended))
                worker.ready, self.reported_ready = None, False
                for stale in self.links.workers[name].came_from.receive():  # the dead process's last words
                    log.info("%s: dropped %s from before it went down", name, type(stale).__name__)
                for live in ended:
                    self._apply_guarded(live, live.session.internal_failure,
                                        "the model process failed; please reconnect")
            case WorkerDown(worker=name, why=why):
                log.warning("%s is down (%s): sessions go on without speech events until it is back", name,
                            why)
            case _:
                log.warning("unexpected internal message %r", msg)

    # ---- carrying out a session's actions ------------------------------------------------------------
    def _apply_guarded(self, live: LiveSession, event: Callable[..., list[Action]], *args: object) -> None:
        """An event from a loop callback (the doorbell, the ticker, the drain): a failure is logged with the
        session's context and stays with that session."""
        try:
            self._apply(live, event(*args))
        except Exception:
            log.exception("session=%s slot=%d: %s failed", *live.ctx(), event.__name__)

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
        if live.link is not None and live.link.wants_to_send():
            live.link.wake.set()

    def _release(self, live: LiveSession, reason: EndReason) -> None:
        session = live.session
        if not self.slots.release(session.slot, session.gen):
            raise RuntimeError("session={} slot={}: released twice".format(*live.ctx()))
        self.tokens.retire(live.key)
        if live.link is not None:
            self.closing.add(live)  # its handler sees its connection close, and counts it as ended
        else:  # detached: no connection, no handler
            self.ended.add(session.counters)
        self._tell_workers(session.slot, SessionClose(slot=session.slot, gen=session.gen, reason=reason))
        c = session.counters
        log.info("session=%s slot=%d: ended (%s) after %.1f s, frames in=%d out=%d, input dropped=%d "
                 "realigned=%d rate-limited=%d lost=%d, output dropped=%d, latency spikes=%d", *live.ctx(),
                 reason.value, time.monotonic() - session.started, c.frames_in, c.frames_out, c.input_dropped,
                 c.input_realigned, c.input_rate_limited, c.input_lost, c.output_dropped, c.latency_spikes)
        if self.draining and not len(self.slots):  # what a drain waits for (a drain sets it at its start)
            self.no_sessions.set()

    def _detached(self, live: LiveSession, reason: EndReason) -> None:
        """The session's link dropped and it waits for a resume: its inference worker stops waiting for its
        audio (procs/inference/clock.py: `replace`)."""
        session = live.session
        live.link = None
        self.links.workers[self.inference.owner(session.slot).name].to.send(
            SessionDetached(slot=session.slot, gen=session.gen))
        log.info("session=%s slot=%d: connection lost (%s); kept %g s for a resume", *live.ctx(),
                 reason.value, self.rules.resume_window_s)

    def _tell_workers(self, slot: int, msg: SessionOpen | SessionClose) -> None:
        """The slot's inference worker and the VAD."""
        self.links.workers[self.inference.owner(slot).name].to.send(msg)
        self.links.workers["vad"].to.send(msg)

    # ---- HTTP -----------------------------------------------------------------------------------------
    def _process_request(self, _conn: ServerConnection, request: Request) -> Response | None:
        try:
            response = self.http.respond(request, time.time())
            if response is not None and response.status_code == MISDIRECTED:
                # What an operator whose balancer forwards a public name sees first: say which, and the fix.
                held_back = self.warnings.allow("misdirected", time.monotonic())
                if held_back is not None:
                    log.warning("refused a request for Host %r (421): not a name this server answers for; if "
                                "it is yours, add it with --allowed-hosts (%d more held back)",
                                request.headers.get("Host", "")[:100], held_back)
            return response
        except Exception as exc:  # a bug of ours, found by a request a client controls: a 500, one line
            # (a traceback per request would let any client flood the log; the type says where to look)
            held_back = self.warnings.allow("http-500", time.monotonic())
            if held_back is not None:
                log.error("an HTTP request (a path of %d characters) failed: %s: %s (%d more held back)",
                          len(request.path), type(exc).__name__, str(exc)[:200], held_back,
                          exc_info=log.isEnabledFor(logging.DEBUG))
            return internal_error()

    def _websocket_refusal(self) -> str | None:
        if not self.is_ready:
            return "starting"
        return "draining" if self.draining else None

    def _health(self) -> Health:
        active = len(self.slots)
        capacity = self.capacity  # read once: the state and the figures say the same moment
        if self.draining:
            state = "draining"
        elif not self.is_ready:
            state = "starting"
        elif capacity <= active:
            state = "full"
        else:
            state = "ok"
        model = self.inference.first_ready
        now_ns = time.monotonic_ns()
        return Health(
            status=state,
            sessions_active=active,
            max_sessions=capacity,
            model=model.model if model else "",
            engine=self.cfg.engine,
            demo_weights=model.demo_weights if model else False,
            workers=[WorkerHealth(name=w.name, device=w.place.device or "",
                                  status=self.inference.status(w, now_ns),
                                  sessions_active=self.slots.count(w.place.slots),
                                  max_sessions=self.inference.room(w, now_ns))
                     for w in self.inference],
        )

    def _render_metrics(self) -> str:
        totals = SessionCounters()
        totals.add(self.ended)
        for live in [*self.slots.live(), *self.closing]:
            totals.add(live.session.counters)
        m = self.metrics
        m.sessions_active.set(len(self.slots))
        m.sessions_detached.set(sum(live.session.phase is Phase.DETACHED for live in self.slots.live()))
        m.sessions_max.set(self.capacity)
        now_ns = time.monotonic_ns()
        status = {w.name: self.inference.status(w, now_ns) for w in self.inference}
        m.worker_up.set_all({name: float(state == "ready") for name, state in status.items()})
        m.worker_sessions_active.set_all({w.name: self.slots.count(w.place.slots) for w in self.inference})
        m.worker_sessions_max.set_all({w.name: self.inference.room(w, now_ns) for w in self.inference})
        m.frames_in.set_total(totals.frames_in)
        m.frames_out.set_total(totals.frames_out)
        m.input_frames_dropped.set_total(totals.input_dropped)
        m.input_frames_realigned.set_total(totals.input_realigned)
        m.input_frames_rate_limited.set_total(totals.input_rate_limited)
        m.output_frames_dropped.set_total(totals.output_dropped)
        m.protocol_errors.set_total(totals.malformed)
        m.input_frames_lost.set_total(totals.input_lost)
        m.latency_spikes.set_total(totals.latency_spikes)
        m.client_underruns.set_total(totals.client_underruns)
        m.client_late_frames.set_total(totals.client_late_frames)
        m.client_concealed_seconds.set_total(totals.client_concealed_us / 1e6)
        warned: dict[str, float] = {}
        for live in self.slots.live():
            for warning in live.warnings:
                warned[warning] = warned.get(warning, 0.0) + 1
        m.sessions_warned.set_all(warned)
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
        # `?codec=` is ours (checked in the handshake); moshi's wire is Ogg/Opus by its own adapter, whatever
        # the query says, and moshi's clients know nothing of resuming.
        moshi = is_moshi(ws)
        rules = dataclasses.replace(self.rules, resume_window_s=0.0) if moshi else self.rules
        start = self._session_start(ws, uuid.uuid4().hex[:12], (slot, gen), rules)
        try:
            session = Session(start, slot, gen, now=time.monotonic(), rules=rules)
            wire: Wire = (MoshiAdapter(session, moshi_params(ws.request.path))  # type: ignore[union-attr]
                          if moshi else ws_wire(session, ws_codec(ws)))
        except BaseException:
            self.tokens.retire((slot, gen))  # a session that never was: its token names nothing
            raise
        return LiveSession(session, Link(ws, wire))

    def _session_start(self, ws: ServerConnection, session_id: str, key: tuple[int, int], rules: SessionRules,
                       resume_gap_s: float | None = None) -> SessionStart:
        """The `session_start` of a connection: of a new session, or (`resume_gap_s`) of a resumed one, with
        the session's new resume token if it can be resumed."""
        model = self.inference.first_ready
        assert model is not None
        codec = "pcm" if is_moshi(ws) else ws_codec(ws)
        resumable = rules.resume_window_s > 0
        return session_start(session_id, model=model.model, demo_weights=model.demo_weights,
                             max_sessions=self.capacity, codec=codec,
                             resume_token=self.tokens.issue(key) if resumable else None,
                             resume_window_s=rules.resume_window_s, resume_gap_s=resume_gap_s)

    def _resume_target(self, ws: ServerConnection) -> LiveSession | ResumeRefusal | None:
        """The session a `/ws?resume=TOKEN` handshake resumes (its token spent), why it resumes none, or None
        if it asks for no resume."""
        if is_moshi(ws) or ws.request is None or (token := requested_resume(ws.request.path)) is None:
            return None
        key = self.tokens.redeem(token)
        if isinstance(key, ResumeRefusal):
            return key
        live = self.slots.get(*key)
        if live is None or live.session.phase not in (Phase.OPEN, Phase.DETACHED):  # cannot be: retired
            return ResumeRefusal.EXPIRED
        return live

    def _resume(self, live: LiveSession, ws: ServerConnection) -> Link | None:
        """Re-attach `live` to the new connection `ws`, taking it over from a connection it still has; None if
        it cannot be (taken over as a drain began, it ended)."""
        session, now = live.session, time.monotonic()
        if (old := live.link) is not None:  # a link the server has not seen drop (the client has)
            self._apply(live, session.connection_replaced(now))
            if session.phase is Phase.DETACHED:
                self._detached(live, EndReason.RECONNECTING)
            closer = asyncio.create_task(old.ws.close(CLOSE_RESUMED_ELSEWHERE, RESUMED_ELSEWHERE))
            self.closers.add(closer)
            closer.add_done_callback(self.closers.discard)
        if session.detached_at is None:
            return None
        gap_s = now - session.detached_at
        start = self._session_start(ws, session.session_id, live.key, session.rules, resume_gap_s=gap_s)
        link = Link(ws, ws_wire(session, ws_codec(ws)), unconfirmed=True)
        live.link = link
        self._apply(live, session.attach(start, now))
        self.metrics.sessions_resumed.inc()
        self.metrics.resume_gap_seconds.observe(gap_s)
        log.info("session=%s slot=%d: resumed from %s after %.2f s", *live.ctx(), ws.remote_address, gap_s)
        return link

    async def _session(self, ws: ServerConnection) -> None:
        target = self._resume_target(ws)
        if isinstance(target, LiveSession):
            if (link := self._resume(target, ws)) is not None:
                await self._carry(target, link)
                return
            target = ResumeRefusal.EXPIRED
        if target is not None:  # counted here: a full server answers it with `capacity` alone
            self.metrics.resume_failures.inc(target.value)
            log.info("resume refused for %s (%s): a fresh session if there is room", ws.remote_address,
                     target.value)
        live = await self._admit(ws)
        if live is None:
            return
        assert live.link is not None
        if target is not None:  # a resume that failed: a fresh session goes on, and says why
            self._apply(live, live.session.resume_failed(
                Error(code=ErrorCode.RESUME_FAILED, msg=REFUSAL_MESSAGES[target], fatal=False)))
        await self._carry(live, live.link)

    async def _admit(self, ws: ServerConnection) -> LiveSession | None:
        """A new session for `ws` in a free slot of the ready worker with the most room, its workers told; or
        None, the client told why (capacity)."""
        # A free slot is not enough: the process's open files must leave the reserve free (procs/fdlimit.py).
        room = room_for_a_session()
        now_ns = time.monotonic_ns()
        worker = self.inference.choose(self.slots.count, now_ns) if room else None
        live = (None if worker is None else
                self.slots.admit(self.inference.room(worker, now_ns),
                                 lambda slot, gen: self._open(ws, slot, gen), within=worker.place.slots))
        if live is None:
            self.metrics.sessions_rejected.inc()
            if room:
                log.info("refused %s: at capacity (%d sessions)", ws.remote_address, len(self.slots))
            elif (held_back := self.warnings.allow("open-files", time.monotonic())) is not None:
                log.warning("refused %s: the open-files limit (%d) is nearly reached with %d sessions (%d "
                            "refusals not logged)", ws.remote_address, soft_limit(), len(self.slots),
                            held_back)
            with contextlib.suppress(ConnectionClosed):
                refusals = moshi_capacity_refusal(CAPACITY_MESSAGE) if is_moshi(ws) else [capacity_refusal()]
                for refusal in refusals:
                    await ws.send(refusal)
                await ws.close(CLOSE_CODES[EndReason.CAPACITY], CAPACITY_MESSAGE)
            return None
        session = live.session
        ring = self.links.audio_from_inference[session.slot]
        while ring.peek() is not None:  # output left over from the slot's previous session
            ring.release()
        self.metrics.sessions_total.inc()
        self._tell_workers(session.slot, SessionOpen(slot=session.slot, gen=session.gen,
                                                     session_id=session.session_id))
        assert live.link is not None
        if not isinstance(live.link.wire, MoshiAdapter):
            log.info("session=%s slot=%d: open from %s", *live.ctx(), ws.remote_address)
        else:  # the sampling settings a moshi client asks for are not honoured: say which were asked
            log.info("session=%s slot=%d: open from %s on moshi's /api/chat (ignored settings: %s)",
                     *live.ctx(), ws.remote_address, live.link.wire.params.given() or "none")
        return live

    async def _carry(self, live: LiveSession, link: Link) -> None:
        """Carry the session over `link` until its connection ends, then tell the session how it ended, unless
        a resume on another connection has taken the session over meanwhile."""
        session, ws = live.session, link.ws
        sender: asyncio.Task | None = None
        try:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:  # unsent audio waits in the session's bounded queue, not in the kernel
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            if self.stop_now.is_set():  # admitted as the stop began: it missed the goodbye
                self._apply(live, session.shutdown())
            elif self.draining:  # admitted as the drain began: it missed the notice
                self._apply(live, session.drain(self.cfg.drain_timeout_s))
            link.wake.set()  # session_start
            sender = asyncio.create_task(self._sender(live, link), name=f"sender-{session.session_id}")
            async for message in ws:
                if live.link is not link:  # resumed on another connection: this one is closed so
                    await ws.close(CLOSE_RESUMED_ELSEWHERE, RESUMED_ELSEWHERE)  # (not 1000 as it returns)
                    break
                if link.unconfirmed:
                    self.tokens.confirm(live.key)
                    link.unconfirmed = False
                self._apply(live, link.receive(message, time.monotonic_ns()))
                if session.counters.input_rate_limited > live.rate_limited_logged:
                    self._warn_rate_limited(live)
        except ConnectionClosed:
            pass
        finally:
            if sender is not None:
                sender.cancel()
            try:
                if live.link is link:
                    reason = why_closed(ws)
                    actions = session.connection_closed(reason, time.monotonic())
                    if session.phase is Phase.DETACHED:
                        self._detached(live, reason)
                    self._apply(live, actions)
            finally:
                link.wire.close()
                if live.link is link:  # the session ended on this connection (not detached, not taken over)
                    self.closing.discard(live)
                    self.ended.add(session.counters)

    def _observe_client_stats(self, live: LiveSession) -> None:
        """The page's latest figures, once a report period like the server's own: a page that sends
        `client_stats` as fast as its budget allows weighs in the histograms as much as one that does not."""
        stats = live.session.client_stats
        if stats is None or stats is live.client_stats_observed:
            return
        live.client_stats_observed = stats
        self.metrics.client_playout_delay_seconds.observe(stats.playout_delay_ms / 1e3)
        if stats.rtt_ms is not None:
            self.metrics.client_rtt_seconds.observe(stats.rtt_ms / 1e3)

    def _observe_quality(self, live: LiveSession, report: QualityReport) -> None:
        """A session's new quality report (from its outbox): into the histograms, and its warnings into the
        log when they change."""
        self._observe_client_stats(live)
        quality = report.quality
        if report.window_frames:
            self.metrics.input_level_dbfs.observe(quality.level_dbfs)
        if quality.snr_db is not None:
            self.metrics.snr_db.observe(quality.snr_db)
        if quality.warnings != live.warnings:
            log.info("session=%s slot=%d: audio quality warnings: %s (level %.0f dBFS, SNR %s dB, loss "
                     "%.1f %%, spikes %d)", *live.ctx(), ", ".join(quality.warnings) or "none",
                     quality.level_dbfs, "?" if quality.snr_db is None else f"{quality.snr_db:.0f}",
                     quality.input_loss_pct, quality.spikes)
            live.warnings = quality.warnings

    def _warn_rate_limited(self, live: LiveSession) -> None:
        refused = live.session.counters.input_rate_limited
        held_back = self.warnings.allow(("rate", live.session.session_id), time.monotonic())
        if held_back is not None:
            log.warning("session=%s slot=%d: audio faster than real time: %d frames refused so far (%d "
                        "warnings held back)", *live.ctx(), refused, held_back)
        live.rate_limited_logged = refused

    async def _sender(self, live: LiveSession, link: Link) -> None:
        """The one task that drains this session's outbox over `link`, through its wire's edge, in the order
        the session says: to the client, or (a quality report) into the metrics."""
        ws = link.ws
        try:
            while live.link is link:  # a resume on another connection takes the outbox with the session
                item = link.next_outgoing(time.monotonic_ns())
                if item is None:
                    await link.wake.wait()
                    link.wake.clear()
                elif isinstance(item, QualityReport):
                    try:  # a failure in the metrics stays there: the client's messages go on
                        self._observe_quality(live, item)
                    except Exception:
                        log.exception("session=%s slot=%d: observing its quality report failed", *live.ctx())
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
            self.links.heartbeat.beat()
            await asyncio.sleep(TICK_S)  # a period, not synchronisation
            now = time.monotonic()
            for live in self.slots.live():
                self._apply_guarded(live, live.session.tick, now)


class HttpConnection(ServerConnection):
    """websockets' connection, except that a request with a body (`POST` with `Content-Length`, chunked) is
    answered like any other (`process_request`: 405 for a method we do not serve, 400 for a WebSocket
    handshake) instead of being dropped without a reply, which is what websockets' parser does with a body
    it will not read.

    Its body headers are shown to the parser renamed (`X-Unread-Content-Length`: http.UNREAD_BODY_PREFIX),
    so the request parses; the body itself is never read (or taken for WebSocket frames): the parser waits
    until the response, which closes the connection (`Connection: close`), discards the rest."""

    def __init__(self, protocol: ServerProtocol, *args: Any, **kwargs: Any) -> None:
        reader = protocol.reader
        read_line = reader.read_line

        def read_line_hiding_the_body(*args: Any) -> Generator[None, None, bytes]:
            line = yield from read_line(*args)
            name, _, value = line.partition(b":")
            # `Content-Length: 0` is no body: websockets takes it (some devices send one).
            if (protocol.state is CONNECTING and name.strip().lower() in BODY_HEADERS
                    and not (name.strip().lower() == b"content-length" and value.strip() == b"0")):
                reader.read_exact = wait_for_the_refusal  # type: ignore[method-assign]
                line = UNREAD_BODY_PREFIX.encode() + line
            return line

        def wait_for_the_refusal(*_args: Any) -> Generator[None, None, bytes]:
            """In place of reading frames after a request with a body: nothing is read until the refusal's
            parser discards everything (or the client leaves)."""
            while not reader.eof:
                yield
            raise EOFError("the client left before its request was answered")

        reader.read_line = read_line_hiding_the_body  # type: ignore[method-assign]
        # The handshake parser started in the protocol's constructor, with the reader's own method; nothing
        # has been received yet, so it starts again on this one (frames are read with whatever `read_exact`
        # is then: the reader's own, unless a body was announced).
        protocol.parser = protocol.parse()
        next(protocol.parser)
        super().__init__(protocol, *args, **kwargs)


BODY_HEADERS = (b"content-length", b"transfer-encoding")


def ws_codec(ws: ServerConnection) -> str:
    """The codec a `/ws` connection asked for (`?codec=`, checked in the handshake)."""
    return requested_codec(ws.request.path if ws.request is not None else "")


def is_moshi(ws: ServerConnection) -> bool:
    """A connection on moshi.server's `/api/chat` (procs/network/moshi_api.py) rather than our `/ws`."""
    return ws.request is not None and ws.request.path.split("?", 1)[0] == MOSHI_PATH


def why_closed(ws: ServerConnection) -> EndReason:
    """Why a connection went, from the WebSocket library's record of the close frames: the client closed
    it, the library refused something (an oversized message, text that is not UTF-8, no answer to its
    pings), or it died with no close frame at all."""
    protocol = ws.protocol
    sent, received = protocol.close_sent, protocol.close_rcvd
    if sent is not None and not protocol.close_rcvd_then_sent:  # the close began on our side
        if sent.code == CLOSE_CODES[EndReason.MESSAGE_TOO_BIG]:
            return EndReason.MESSAGE_TOO_BIG
        if sent.code == CLOSE_CODES[EndReason.INVALID_UTF8]:
            return EndReason.INVALID_UTF8
        if sent.code == CLOSE_CODES[EndReason.KEEPALIVE_TIMEOUT] and "keepalive" in sent.reason:
            return EndReason.KEEPALIVE_TIMEOUT
    if received is not None:  # the client's close: a goodbye, unless it is leaving to resume
        return EndReason.RECONNECTING if received.code == CLOSE_RECONNECTING else EndReason.CLIENT_CLOSED
    return EndReason.CONNECTION_LOST
