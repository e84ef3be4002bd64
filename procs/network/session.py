"""One WebSocket session's rules, sans I/O.

`Session` is a state machine in python-websockets' shape: the asyncio layer (`server.py`) feeds it events
and carries out what it asks, nothing more; every rule of a session lives here, where a test drives it
without a socket, a ring or an event loop. Time comes in with the events (`time.monotonic()` seconds,
`time.monotonic_ns()` where a frame is stamped); nothing here reads a clock.

It speaks no wire: what comes in is already decoded and what goes out is still typed. Each wire's edge
(`procs/network/wires.py` for `/ws`, PCM or Opus; `procs/network/moshi_api.py` for moshi's Ogg/Opus)
decodes a client's messages into the inputs below and encodes the outbox's items for its socket, so no
wire's bytes are encoded here only to be decoded again there.

Events (methods):
    resume_failed(error)          the client asked to resume a session that could not be (it gets this one)
    receive(input, now_ns)        a client message, decoded: `ClientAudio`, a control message, or the
                                  `ProtocolError` its decoding raised
    model_audio(frame)            a 20 ms frame of model audio the I/O layer read from the inference ring
    voice_activity(event, t_ms)   the VAD process saw speech start or end
    model_text(text, t_ms)        the model's inner monologue
    slot_error(code, msg)         the inference process failed this session
    tick(now)                     the clock: `latency` reports, the idle timeout, the session time limit
    drain(deadline_s)             the server stops taking sessions; this one has `deadline_s` left
    shutdown()                    the server is stopping (or the drain's time is up)
    internal_failure(msg)         the inference process died: the session cannot go on
    connection_replaced(now)      a resume on a new connection takes the session from the one it has
    connection_closed(reason, now)  the socket is gone: the client closed it, the network failed, the
                                  WebSocket layer refused something, or our own close finished
    attach(start, now)            a new connection resumed the detached session (`start`: its
                                  `session_start`, resumed)

Actions, returned by an event, carried out at once (they never wait for a slow client):
    `PublishAudio`: write this client frame to the workers' rings;
    `Release`: the session is over, free its slot and tell the workers.

The outbox, drained by the sender at the client's pace (`next_outgoing(now_ns)`), typed:
    the newest `QualityReport` (for the metrics, not the client), control messages (`ServerControl`),
    model audio (`ModelAudio`: PCM and the latency it completes); once the session ends, what is queued,
    then `SessionEnd` (if the session says goodbye), then one `Close`, last.

States:

    OPEN ─ the server ends it (client_request, idle_timeout, ...) ─▶ CLOSING ─ connection_closed ─▶ CLOSED
     │└────── connection_closed (client_closed, a close the server refused, ...) ─────────────────▶ CLOSED
     └─ connection_closed (no close frame, keepalive timeout, the client's 4000), resumable ─▶ DETACHED
    DETACHED ─ attach ─▶ OPEN
    DETACHED ─ the window passes, the time limit, a drain, shutdown, internal failure ──────────▶ CLOSED

Resume (`resume_window_s` > 0): a link that dies without a close handshake (or that the client abandons
with CLOSE_RECONNECTING, to resume) does not end a session that has had audio: it is DETACHED, keeps its
slot (so it counts for admission) and its model state, sends and publishes nothing (so its model is not
stepped: the conversation goes on from where it stopped, not on silence the client never said), and ends
when its window passes unless a new connection `attach`es it. A session told to drain is not kept (its
server is going).

Invariants (tests/test_session.py checks them over arbitrary event sequences): no event raises; every way
out of OPEN and DETACHED into CLOSING or CLOSED yields exactly one `Release`, and nothing else does; a
session that is not OPEN publishes nothing and queues nothing new; a session the server ends yields exactly
one `Close`; a CLOSED or DETACHED session has nothing to send. Close codes come from one map, `CLOSE_CODES`,
the same for every wire.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import msgspec
import numpy as np
from websockets.frames import CloseCode

from procs.config import ServerConfig
from procs.frames import ModelFrame
from procs.network.quality import QualityMonitor, QualityReport
from procs.network.slots import CAPACITY_CLOSE_CODE, CAPACITY_MESSAGE
from protocol import (
    ClientControl,
    ClientSessionEnd,
    ClientStats,
    Draining,
    EndReason,
    Error,
    ErrorCode,
    Latency,
    LatencyBreakdown,
    Ping,
    Pong,
    ProtocolError,
    ServerControl,
    SessionEnd,
    SessionStart,
    Transcript,
    Vad,
)

# The close code of every ending the server decides or the WebSocket layer refuses with, whatever the wire.
# The endings that are the client's (client_closed, connection_lost) have none of ours.
CLOSE_CODES: Mapping[EndReason, CloseCode] = MappingProxyType({
    EndReason.CLIENT_REQUEST: CloseCode.NORMAL_CLOSURE,
    EndReason.IDLE_TIMEOUT: CloseCode.NORMAL_CLOSURE,
    EndReason.TIME_LIMIT: CloseCode.NORMAL_CLOSURE,
    EndReason.SERVER_SHUTDOWN: CloseCode.GOING_AWAY,
    EndReason.PROTOCOL_ERROR: CloseCode.POLICY_VIOLATION,
    EndReason.RATE_LIMITED: CloseCode.POLICY_VIOLATION,
    EndReason.CAPACITY: CAPACITY_CLOSE_CODE,
    EndReason.INTERNAL: CloseCode.INTERNAL_ERROR,
    EndReason.MESSAGE_TOO_BIG: CloseCode.MESSAGE_TOO_BIG,  # websockets' own, for a message over max_size
    EndReason.INVALID_UTF8: CloseCode.INVALID_DATA,  # websockets' own, for a text frame that is not UTF-8
    EndReason.KEEPALIVE_TIMEOUT: CloseCode.INTERNAL_ERROR,  # websockets' own, reason "keepalive ping timeout"
})
# The connection endings that detach a resumable session rather than end it: the link died, or the client
# abandoned it to resume (its close 4000). A close frame with any other code is the client's goodbye.
RESUMABLE_ENDINGS = frozenset({EndReason.CONNECTION_LOST, EndReason.KEEPALIVE_TIMEOUT,
                               EndReason.RECONNECTING})


class Phase(enum.Enum):
    OPEN = "open"
    DETACHED = "detached"  # the link dropped; kept for its resume window, nothing stepped, nothing sent
    CLOSING = "closing"  # the server ended the session; what is queued goes out, then the close
    CLOSED = "closed"  # the socket is gone


@dataclass(frozen=True)
class SessionRules:
    """The limits a session lives by. Those an operator sets are ServerConfig's, with no default here
    (`SessionRules.of(cfg)`); the others are the protocol's."""

    # A session that sends no audio this long is closed (`idle_timeout`): it would hold a slot for nothing.
    idle_timeout_s: float | None
    # Operators who bill or cap by time end sessions at this age (`time_limit`); None: no limit.
    max_session_s: float | None
    # A session whose link drops is kept this long for a resume (`--resume-window`); 0: never.
    resume_window_s: float = 0.0

    # A client that sends this many malformed messages within `garbage_window_s` is closed (1008); fewer
    # are answered with an `error` each, at most `errors_per_second` of them.
    garbage_limit: int = 50
    garbage_window_s: float = 10.0
    errors_per_second: int = 10
    latency_period_s: float = 1.0
    # Model audio waiting for a slow client: beyond 200 ms of it the oldest frames are dropped (counted), so
    # a client that stops reading hears the present when it resumes, not the past.
    max_queued_audio_frames: int = 10
    # Audio faster than real time: a token bucket refilled at twice real time, two seconds of burst (a
    # client catching up after a network stall). Frames beyond it are refused (counted, `rate_limited`);
    # this many refused within `rate_window_s` close the session with 1008.
    rate_frames_per_s: float = 100.0
    rate_burst_frames: float = 100.0
    rate_close_after: int = 250
    rate_window_s: float = 10.0
    # Control messages (ping, pong) have a budget of their own: the page sends one ping a second; a flood
    # of them would make the server queue answers for a client that may not even read them.
    control_per_s: float = 10.0
    control_burst: float = 20.0

    @classmethod
    def of(cls, cfg: ServerConfig, **protocol: float) -> SessionRules:
        """The rules of a server started with `cfg` (`protocol`: any of the other limits, for a test)."""
        return cls(idle_timeout_s=cfg.idle_timeout_s, max_session_s=cfg.max_session_s,
                   resume_window_s=cfg.resume_window_s, **protocol)


# --- input: a client message as its wire's edge decoded it ------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientAudio:
    """One 20 ms frame of client audio. `data` is its 640 bytes of 16 kHz s16le PCM, or, where `decode` is
    given, the packet that `decode` turns into them (raising `ProtocolError`): the session decodes only a
    frame it admits, so audio refused by the rate limit costs no decoding."""

    data: memoryview
    decode: Callable[[memoryview], memoryview] | None = None


ClientInput = ClientAudio | ClientControl | ProtocolError


# --- actions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishAudio:
    """Write this 20 ms client frame to the inference and VAD rings."""

    pcm: memoryview  # 640 bytes aliasing the received message: use it before the next event
    seq: int
    t_ns: int


@dataclass(frozen=True, slots=True)
class Release:
    """The session is over: give its slot back and tell the workers. Exactly once per session."""

    reason: EndReason


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket with this code; always the last thing a session sends."""

    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class ModelAudio:
    """One 20 ms frame of model audio (960 bytes of 24 kHz s16le PCM), and the server-added latency it
    completes (the first frame of an answered block: last input frame received -> this frame pulled for the
    socket), if any."""

    pcm: bytes
    latency_s: float | None


Action = PublishAudio | Release
Outgoing = QualityReport | ServerControl | ModelAudio | Close


# --- bookkeeping -----------------------------------------------------------------------------------------


@dataclass
class SessionCounters:
    """What a session counted; each "dropped" has one meaning."""

    frames_in: int = 0  # client audio frames received and published
    frames_out: int = 0  # model audio frames handed to the socket
    malformed: int = 0  # client messages that failed to decode
    input_dropped: int = 0  # client frames the model never heard: the session fell behind (inference)
    input_realigned: int = 0  # client frames dropped or repeated to keep the session on the step clock
    input_skipped: int = 0  # first client frames skipped to place the session on the step clock
    input_rate_limited: int = 0  # client frames refused: they came far faster than real time
    output_dropped: int = 0  # model frames never sent: the client did not take them in time
    input_lost: int = 0  # client frames that never came (still missing 1 s after due: quality.py)
    latency_spikes: int = 0  # latency spikes (quality.py)
    # What the page reported (`client_stats`), kept monotone and bounded by the session's age.
    client_underruns: int = 0
    client_late_frames: int = 0
    # Whole microseconds: /metrics sums every session's count in an order that changes as sessions end,
    # and a float sum could then come out a last digit lower (a counter must never go down).
    client_concealed_us: int = 0

    def add(self, other: SessionCounters) -> None:
        for name in vars(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class LatencyWindow:
    """Server-added latency samples of one session since its last `latency` message."""

    total_ms: list[float] = field(default_factory=list)
    queue_ms: float = 0.0
    step_ms: float = 0.0
    resample_ms: float = 0.0
    last: Latency | None = None

    def add(self, total_ms: float, queue_ms: float, step_ms: float, resample_ms: float) -> None:
        self.total_ms.append(total_ms)
        self.queue_ms += queue_ms
        self.step_ms += step_ms
        self.resample_ms += resample_ms

    def flush(self, dropped: int, realigned: int, window_s: float, skipped: int = 0) -> Latency | None:
        """The report for this window (the previous one again if no block was answered meanwhile)."""
        n = len(self.total_ms)
        if n == 0:
            return self.last
        queue, step, resample = self.queue_ms / n, self.step_ms / n, self.resample_ms / n
        msg = Latency(
            ms=float(np.median(self.total_ms)),
            breakdown=LatencyBreakdown(
                queue_ms=queue,
                step_ms=step,
                resample_ms=resample,
                transport_ms=max(0.0, float(np.mean(self.total_ms)) - queue - step - resample),
            ),
            p99_ms=float(np.percentile(self.total_ms, 99)),
            dropped_frames=dropped,
            window_s=window_s,
            realigned_frames=realigned,
            skipped_frames=skipped,
        )
        self.total_ms.clear()
        self.queue_ms = self.step_ms = self.resample_ms = 0.0
        self.last = msg
        return msg


@dataclass(slots=True)
class _QueuedAudio:
    pcm: bytes
    t_in_ns: int | None  # set on the first frame of a block: its latency is measured when it leaves
    queue_ms: float
    step_ms: float
    resample_ms: float


def _trim(times: deque[float], before: float) -> None:
    while times and times[0] < before:
        times.popleft()


class TokenBucket:
    """`rate_per_s` tokens a second, at most `burst` saved up; each accepted message takes one."""

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s, self.burst = rate_per_s, burst
        self.tokens, self.at = burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate_per_s)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


# --- the machine -----------------------------------------------------------------------------------------


class Session:
    """One client's session in one batch slot. See the module docstring for its events and actions."""

    def __init__(self, start: SessionStart, slot: int, gen: int, now: float,
                 rules: SessionRules | None = None) -> None:
        """`rules`: None, those of a server with ServerConfig's defaults."""
        self.session_id = start.session_id
        self.slot, self.gen = slot, gen
        self.rules = rules or SessionRules.of(ServerConfig())
        self.phase = Phase.OPEN
        self.close: Close | None = None  # the close the server asked for, if it ended the session
        self.client_stats: ClientStats | None = None  # the page's last `client_stats`
        self._goodbye: EndReason | None = None  # `session_end` owed, sent once what is queued has gone
        self.started = now
        self.end_reason: EndReason | None = None
        self.counters = SessionCounters()
        self.latency = LatencyWindow()
        self.quality = QualityMonitor()
        self._quality: QualityReport | None = None  # the newest report, until the sender takes it
        self._control: deque[ServerControl] = deque([start])
        self._audio: deque[_QueuedAudio] = deque()
        self._close_sent = False
        self._garbage: deque[float] = deque()
        self._errors_sent: deque[float] = deque()
        self._next_report = now + self.rules.latency_period_s
        self._last_audio = now
        self._audio_rate = TokenBucket(self.rules.rate_frames_per_s, self.rules.rate_burst_frames, now)
        self._control_rate = TokenBucket(self.rules.control_per_s, self.rules.control_burst, now)
        self._refused: deque[float] = deque()
        self._draining = False  # told to drain: a dropped link ends the session (the server is going)
        self.detached_at: float | None = None  # when the link dropped, while DETACHED
        self.resumes = 0  # connections that re-attached it

    # ---- events -----------------------------------------------------------------------------------------
    def receive(self, decoded: ClientInput, now_ns: int) -> list[Action]:
        if self.phase is not Phase.OPEN:
            return []
        if isinstance(decoded, ProtocolError):
            return self._malformed(decoded, now_ns / 1e9)
        if isinstance(decoded, ClientAudio):
            now = now_ns / 1e9
            if not self._audio_rate.take(now):
                self.counters.input_rate_limited += 1
                return self._too_fast(now, "audio faster than real time")
            pcm = decoded.data
            if decoded.decode is not None:
                try:  # to the same 640 bytes of PCM a PCM client sends: the rings never know
                    pcm = decoded.decode(pcm)
                except ProtocolError as error:
                    return self._malformed(error, now)
            self._last_audio = now
            seq = self.counters.frames_in
            self.counters.frames_in += 1
            self.quality.frame(np.frombuffer(pcm, dtype="<i2"), seq, now)
            return [PublishAudio(pcm, seq, now_ns)]
        if not isinstance(decoded, ClientSessionEnd) and not self._control_rate.take(now_ns / 1e9):
            return self._too_fast(now_ns / 1e9, "control messages too fast")
        match decoded:
            case Ping(id=ping_id, t_ms=t_ms):
                self._say(Pong(id=ping_id, t_ms=t_ms))
            case Pong():
                pass
            case ClientStats():
                self.client_stats = decoded  # the page's view of playback, for metrics and the quality report
                self.quality.client_stats(decoded, now_ns / 1e9 - self.started)
                q, c = self.quality, self.counters
                c.client_underruns, c.client_late_frames = q.client_underruns, q.client_late_frames
                c.client_concealed_us = round(q.client_concealed_ms * 1e3)
            case ClientSessionEnd():
                return self._end_saying_goodbye(EndReason.CLIENT_REQUEST, "session ended")
        return []

    def model_audio(self, frame: ModelFrame) -> list[Action]:
        if frame.gen != self.gen:
            return []  # a previous session's frame is stale
        if self.phase is Phase.DETACHED:  # what the model said of the audio it had before the drop
            self.counters.output_dropped += 1
            return []
        if self.phase is not Phase.OPEN:
            return []  # a session that is over hears nothing
        self.counters.input_dropped = max(self.counters.input_dropped, frame.dropped)
        self.counters.input_realigned = max(self.counters.input_realigned, frame.realigned)
        self.counters.input_skipped = max(self.counters.input_skipped, frame.skipped)
        if len(self._audio) >= self.rules.max_queued_audio_frames:
            self._audio.popleft()
            self.counters.output_dropped += 1
        self._audio.append(
            _QueuedAudio(
                pcm=frame.pcm,
                t_in_ns=frame.t_in_ns if frame.block_pos == 0 else None,
                queue_ms=frame.queue_us / 1e3,
                step_ms=frame.step_us / 1e3,
                resample_ms=frame.resample_us / 1e3,
            )
        )
        return []

    def voice_activity(self, event: Literal["start", "end"], t_ms: float) -> list[Action]:
        if self.phase is Phase.OPEN:
            self.quality.voice_activity(event, t_ms)  # speech vs. silence: the SNR estimate's split
            self._say(Vad(event=event, t_ms=t_ms))
        return []

    def model_text(self, text: str, t_ms: float) -> list[Action]:
        if self.phase is Phase.OPEN:
            self._say(Transcript(text=text, t_ms=t_ms))
        return []

    def slot_error(self, code: ErrorCode, msg: str) -> list[Action]:
        if self.phase is Phase.DETACHED and code is ErrorCode.CAPACITY:
            return self._end_detached(EndReason.CAPACITY)
        if self.phase is not Phase.OPEN:
            return []
        if code is ErrorCode.CAPACITY:
            self._say(Error(code=code, msg=msg, fatal=True))
            return self._end(EndReason.CAPACITY, CAPACITY_MESSAGE)
        self._say(Error(code=code, msg=msg, fatal=False))
        return []

    def tick(self, now: float) -> list[Action]:
        """At least one `latency` report per period once the session has produced audio; the idle timeout
        and the session time limit."""
        rules = self.rules
        if self.phase is Phase.DETACHED:
            assert self.detached_at is not None
            if now - self.detached_at >= rules.resume_window_s:
                return self._end_detached(EndReason.CONNECTION_LOST)
            if rules.max_session_s is not None and now - self.started >= rules.max_session_s:
                return self._end_detached(EndReason.TIME_LIMIT)
            return []
        if self.phase is not Phase.OPEN:
            return []
        if rules.idle_timeout_s is not None and now - self._last_audio >= rules.idle_timeout_s:
            self._say(Error(code=ErrorCode.IDLE_TIMEOUT, fatal=True,
                            msg=f"no audio for {rules.idle_timeout_s:g} s: the session is closed"))
            return self._end(EndReason.IDLE_TIMEOUT, "idle timeout")
        if rules.max_session_s is not None and now - self.started >= rules.max_session_s:
            self._say(Error(code=ErrorCode.TIME_LIMIT, fatal=True,
                            msg=f"sessions last at most {rules.max_session_s:g} s on this server"))
            return self._end_saying_goodbye(EndReason.TIME_LIMIT, "session time limit")
        if now >= self._next_report:
            self._next_report += self.rules.latency_period_s
            if self._next_report <= now:  # the clock stalled for more than a period: do not catch up
                self._next_report = now + self.rules.latency_period_s
            c = self.counters
            report = self.latency.flush(c.input_dropped, c.input_realigned, self.rules.latency_period_s,
                                        c.input_skipped)
            quality = self.quality.report(now, dropped=c.input_dropped, frames_out=c.frames_out,
                                          output_dropped=c.output_dropped)
            c.input_lost, c.latency_spikes = self.quality.arrivals.lost, self.quality.spikes
            self._quality = quality
            if report is not None:
                self._say(msgspec.structs.replace(report, quality=quality.quality))
        return []

    def drain(self, deadline_s: float) -> list[Action]:
        self._draining = True
        if self.phase is Phase.DETACHED:  # nobody to finish the conversation with
            return self._end_detached(EndReason.SERVER_SHUTDOWN)
        if self.phase is Phase.OPEN:
            self._say(Draining(deadline_s=deadline_s))
        return []

    def shutdown(self) -> list[Action]:
        if self.phase is Phase.DETACHED:
            return self._end_detached(EndReason.SERVER_SHUTDOWN)
        if self.phase is not Phase.OPEN:
            return []
        return self._end_saying_goodbye(EndReason.SERVER_SHUTDOWN, "server shutting down")

    def internal_failure(self, msg: str) -> list[Action]:
        if self.phase is Phase.DETACHED:
            return self._end_detached(EndReason.INTERNAL)
        if self.phase is not Phase.OPEN:
            return []
        self._say(Error(code=ErrorCode.INTERNAL, msg=msg, fatal=True))
        return self._end(EndReason.INTERNAL, "internal error")

    def resume_failed(self, error: Error) -> list[Action]:
        """This fresh session's client asked to resume one that could not be: `error` says why, right after
        the `session_start`."""
        if self.phase is Phase.OPEN:
            self._say(error)
        return []

    def connection_closed(self, reason: EndReason, now: float) -> list[Action]:
        """`reason`: why the socket went, as the I/O layer saw it (used only if the session was open); `now`:
        when (a resumable session's window starts then)."""
        if self.phase is Phase.DETACHED:
            return []  # its connection was gone already
        # A session that never heard a frame has no conversation to keep: kept anyway, a client could hold a
        # slot for a whole window with one handshake and a reset.
        resumable = reason in RESUMABLE_ENDINGS and self.counters.frames_in > 0 and self._keepable
        if self.phase is Phase.OPEN and resumable:
            return self._detach(now)
        actions: list[Action] = []
        if self.phase is Phase.OPEN:
            actions = self._end(reason, text=None)
        self._control.clear()
        self._audio.clear()
        self._quality = None
        self.phase = Phase.CLOSED
        self._goodbye = None
        return actions

    def connection_replaced(self, now: float) -> list[Action]:
        """A resume on a new connection takes this session over from the link it still has (one the server
        has not seen drop): it is detached, to be attached at once, audio or not (the client has its
        token)."""
        if self.phase is Phase.OPEN and self._keepable:
            return self._detach(now)
        return self.connection_closed(EndReason.RECONNECTING, now)

    @property
    def _keepable(self) -> bool:
        return self.rules.resume_window_s > 0 and not self._draining

    def _detach(self, now: float) -> list[Action]:
        self.counters.output_dropped += len(self._audio)  # what was queued for the dead link is never sent
        self.phase, self.detached_at = Phase.DETACHED, now
        self._control.clear()
        self._audio.clear()
        self._quality = None
        return []

    def attach(self, start: SessionStart, now: float) -> list[Action]:
        """A new connection resumed this DETACHED session: `start` (its `session_start`, `resumed`) goes out
        first and the conversation goes on. Its idle timeout does not count the detached time, nor start
        over (dropping and resuming must not keep a silent session alive)."""
        if self.phase is not Phase.DETACHED:
            raise ValueError(f"session {self.session_id} is {self.phase.value}, not detached")
        assert self.detached_at is not None
        self._last_audio += now - self.detached_at
        self.phase, self.detached_at = Phase.OPEN, None
        self.resumes += 1
        self._control.append(start)
        self._next_report = now + self.rules.latency_period_s
        return []

    # ---- what to send -----------------------------------------------------------------------------------
    def wants_to_send(self) -> bool:
        if self.phase in (Phase.CLOSED, Phase.DETACHED):
            return False
        return (bool(self._control or self._audio) or self._quality is not None
                or (self.close is not None and not self._close_sent))

    @property
    def queued(self) -> int:
        """Messages waiting for the socket (the goodbye, the close and the quality report not counted)."""
        return len(self._control) + len(self._audio)

    def next_outgoing(self, now_ns: int) -> Outgoing | None:
        """The outbox: the next item for the sender. The newest quality report (for the server, not the
        client), then what goes to the socket: control messages first, then model audio, then the close."""
        if self.phase in (Phase.CLOSED, Phase.DETACHED):
            return None
        if self._quality is not None:
            report, self._quality = self._quality, None
            return report
        if self._control:
            return self._control.popleft()
        if self._audio:
            item = self._audio.popleft()
            self.counters.frames_out += 1
            latency_s = None
            if item.t_in_ns is not None:
                latency_s = (now_ns - item.t_in_ns) / 1e9
                self.latency.add(latency_s * 1e3, item.queue_ms, item.step_ms, item.resample_ms)
                self.quality.block_latency(latency_s * 1e3)
            return ModelAudio(item.pcm, latency_s)
        if self._goodbye is not None:  # last before the close, with exact counts
            reason, self._goodbye = self._goodbye, None
            c = self.counters
            return SessionEnd(reason=reason.value, frames_in=c.frames_in, frames_out=c.frames_out)
        if self.close is not None and not self._close_sent:
            self._close_sent = True
            return self.close
        return None

    # ---- rules ------------------------------------------------------------------------------------------
    def _say(self, msg: ServerControl) -> None:
        self._control.append(msg)

    def _too_fast(self, now: float, what: str) -> list[Action]:
        """A message refused by a rate limit: answered (within the error budget); too many close."""
        rules = self.rules
        _trim(self._refused, now - rules.rate_window_s)
        self._refused.append(now)
        if len(self._refused) >= rules.rate_close_after:
            self._say(Error(code=ErrorCode.RATE_LIMITED, fatal=True, msg=f"{what} for too long"))
            return self._end(EndReason.RATE_LIMITED, what)
        self._error_within_budget(now, Error(code=ErrorCode.RATE_LIMITED, msg=f"{what}: messages refused"))
        return []

    def _error_within_budget(self, now: float, error: Error) -> None:
        _trim(self._errors_sent, now - 1.0)
        if len(self._errors_sent) < self.rules.errors_per_second:
            self._errors_sent.append(now)
            self._say(error)

    def _malformed(self, error: ProtocolError, now: float) -> list[Action]:
        rules = self.rules
        self.counters.malformed += 1
        _trim(self._garbage, now - rules.garbage_window_s)
        self._garbage.append(now)
        if len(self._garbage) >= rules.garbage_limit:
            self._say(Error(code=error.code, msg=f"too many malformed messages: {error.msg}", fatal=True))
            return self._end(EndReason.PROTOCOL_ERROR, "too many malformed messages")
        self._error_within_budget(now, error.to_message())
        return []

    def _end_saying_goodbye(self, reason: EndReason, text: str) -> list[Action]:
        self._goodbye = reason
        return self._end(reason, text)

    def _end_detached(self, reason: EndReason) -> list[Action]:
        """The one way out of DETACHED other than `attach`: the slot is released; no connection to close."""
        assert self.phase is Phase.DETACHED
        self.phase, self.detached_at = Phase.CLOSED, None
        self.end_reason = reason
        return [Release(reason)]

    def _end(self, reason: EndReason, text: str | None) -> list[Action]:
        """The one way out of OPEN: the slot is released here and nowhere else. `text`: the close's reason,
        its code `CLOSE_CODES[reason]`; None: the connection is gone already, nothing to close."""
        assert self.phase is Phase.OPEN
        self.phase = Phase.CLOSING
        self.close = None if text is None else Close(CLOSE_CODES[reason], text)
        self.end_reason = reason
        return [Release(reason)]
