"""Control messages carried in JSON text frames.

Every message is a msgspec Struct in a tagged union: its JSON object carries a "type" field whose
value is the tag given here. Structs are frozen, so one message object can be shared freely (and
module-level format constants are safe). Unknown extra fields are ignored when decoding, so a newer
peer may add fields without breaking an older one.

Non-finite floats (NaN, ±inf) have no JSON spelling: msgspec encodes them as `null`, which the
other side rejects as `bad_field`. Senders must only put finite numbers in float fields.
"""

from typing import Annotated, Final, Literal

import msgspec

from protocol.codes import ErrorCode
from protocol.constants import (
    CLIENT_AUDIO,
    CLIENT_OPUS,
    FRAME_MS,
    IN_FRAME_BYTES,
    IN_RATE,
    MAX_OPUS_PACKET_BYTES,
    MAX_SAFE_INTEGER,
    OUT_FRAME_BYTES,
    OUT_RATE,
    PROTOCOL_VERSION,
    SERVER_AUDIO,
    SERVER_OPUS,
)

# Ping ids are echoed by JavaScript peers, so they must stay exact there.
MessageId = Annotated[int, msgspec.Meta(ge=0, le=MAX_SAFE_INTEGER)]


class _Control(msgspec.Struct, tag_field="type", frozen=True):
    """Base of every control message; subclasses set `tag=` to their wire name."""


class AudioFormat(msgspec.Struct, frozen=True, kw_only=True):
    """Describes one direction's binary audio frames (sent inside `session_start`)."""

    encoding: str = "pcm_s16le"  # or "opus": one Opus packet per frame
    sample_rate: int
    channels: int = 1
    frame_ms: int = FRAME_MS
    frame_bytes: int  # PCM: every frame's size; Opus: the largest packet
    prefix: int  # first byte of every binary frame in this direction


CLIENT_AUDIO_FORMAT: Final = AudioFormat(sample_rate=IN_RATE, frame_bytes=IN_FRAME_BYTES, prefix=CLIENT_AUDIO)
SERVER_AUDIO_FORMAT: Final = AudioFormat(
    sample_rate=OUT_RATE, frame_bytes=OUT_FRAME_BYTES, prefix=SERVER_AUDIO
)

# Opus packets carry 20 ms at the same rates as the PCM they replace: the rings and the model never know.
CLIENT_OPUS_FORMAT: Final = AudioFormat(encoding="opus", sample_rate=IN_RATE,
                                        frame_bytes=MAX_OPUS_PACKET_BYTES, prefix=CLIENT_OPUS)
SERVER_OPUS_FORMAT: Final = AudioFormat(encoding="opus", sample_rate=OUT_RATE,
                                        frame_bytes=MAX_OPUS_PACKET_BYTES, prefix=SERVER_OPUS)
AUDIO_FORMATS: Final = {  # codec name (`?codec=`) -> (client format, server format)
    "pcm": (CLIENT_AUDIO_FORMAT, SERVER_AUDIO_FORMAT),
    "opus": (CLIENT_OPUS_FORMAT, SERVER_OPUS_FORMAT),
}


class LatencyBreakdown(msgspec.Struct, frozen=True):
    """Where the server's processing time went, in milliseconds."""

    queue_ms: float = 0.0
    step_ms: float = 0.0
    resample_ms: float = 0.0
    transport_ms: float = 0.0


# --- server -> client ---------------------------------------------------------------------------


class SessionStart(_Control, tag="session_start"):
    """First message of every session: what the server expects and what it will send."""

    session_id: str
    protocol_version: int
    input: AudioFormat
    output: AudioFormat
    model: str  # checkpoint name
    demo_weights: bool  # True when the model has random/demo weights (its speech is not meaningful)
    max_sessions: int
    # Resume (README, "Resuming a session"): the token that re-attaches this session within
    # `resume_window_s` of a dropped link (`/ws?resume=TOKEN`); each `session_start` carries a new one and
    # the one used is spent. None: this session cannot be resumed (`--resume-window 0`, moshi's wire).
    resume_token: str | None = None
    resume_window_s: float = 0.0
    resumed: bool = False  # this connection re-attached a session that was already going on
    resume_gap_s: float | None = None  # resumed: from the server noticing the drop to the re-attach


class SessionEnd(_Control, tag="session_end"):
    """Last message of a session, from the server."""

    reason: str  # an EndReason value: "client_request" or "server_shutdown" (kept a str for newer values)
    frames_in: int = 0
    frames_out: int = 0


QualityWarning = Literal["clipping", "quiet", "noisy", "input_loss", "output_drops", "latency_spikes",
                         "playback_gaps"]


class SessionQuality(msgspec.Struct, frozen=True, kw_only=True):
    """What the server measured of one session's audio (inside `latency`, once a second). Levels are dB
    relative to full scale over the last window; the rest counts since the session started."""

    level_dbfs: float  # input RMS level, last window (-120.0 for digital silence)
    peak_dbfs: float  # input peak, last window
    clipped_pct: float  # share of input samples at (or within 1 LSB of) full scale, last window
    snr_db: float | None = None  # speech power (VAD: speech) over the noise floor (VAD: silence)
    input_loss_pct: float = 0.0  # input frames that never came, or came too late for their block
    output_dropped: int = 0  # model frames never sent (the client did not take them in time)
    spikes: int = 0  # latency spikes so far (a window well above the session's running median)
    warnings: tuple[QualityWarning, ...] = ()  # what a person can act on now


class Latency(_Control, tag="latency"):
    """Server processing time: last input frame of an 80 ms block received -> first answer frame sent."""

    ms: float
    breakdown: LatencyBreakdown
    p99_ms: float
    dropped_frames: int  # input the model never heard because the session fell behind, so far
    window_s: float  # the window `p99_ms` covers
    realigned_frames: int = 0  # input frames dropped or repeated so far to keep it on the step clock
    # Input frames skipped, right after the session's first block, to place it on the step clock: the
    # model's block 0 ends with input frame 3, block k >= 1 with skipped + dropped + 4k + 3 (realignments
    # aside).
    skipped_frames: int = 0
    quality: SessionQuality | None = None


class Error(_Control, tag="error"):
    """A refused frame (fatal=False, the session goes on) or a session-ending condition (fatal=True)."""

    code: ErrorCode
    msg: str
    fatal: bool = False


class Draining(_Control, tag="draining"):
    """The server is stopping: no new sessions; this one may go on for `deadline_s` more seconds, then it
    gets `session_end` (server_shutdown). A page can say so and finish the conversation."""

    deadline_s: float


class Vad(_Control, tag="vad"):
    """Voice activity edge in the client's audio, at `t_ms` on the session's own audio clock."""

    event: Literal["start", "end"]
    t_ms: float


class Transcript(_Control, tag="transcript"):
    """Text the model produced (its inner monologue), at `t_ms` on the session's audio clock."""

    text: str
    t_ms: float


# --- both directions ----------------------------------------------------------------------------


class Ping(_Control, tag="ping"):
    """Liveness/RTT probe; the receiver answers with a `Pong` carrying the same id and t_ms."""

    id: MessageId
    t_ms: float  # sender's clock


class Pong(_Control, tag="pong"):
    """Answer to a `Ping`: echoes its id and t_ms."""

    id: MessageId
    t_ms: float


# --- client -> server ---------------------------------------------------------------------------


class ClientSessionEnd(_Control, tag="session_end"):
    """The client asks to end its session; the server answers with `SessionEnd` and closes."""

    reason: str = "client_request"


Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_SAFE_INTEGER)]
Millis = Annotated[float, msgspec.Meta(ge=0.0, le=600_000.0)]


class ClientStats(_Control, tag="client_stats", kw_only=True):
    """What only the page can see, sent about once a second; counts are since the session started."""

    underruns: Count  # playback ran dry: gaps concealed with silence
    concealed_ms: Millis  # total silence played in place of missing audio
    late_frames: Count  # server audio the jitter buffer threw away as too late to play (20 ms frames' worth)
    playout_delay_ms: Millis  # the jitter buffer's mean depth (what it adds to mouth-to-ear)
    rtt_ms: Millis | None = None  # last ping -> pong round trip


ServerControl = SessionStart | SessionEnd | Latency | Error | Draining | Vad | Transcript | Ping | Pong
ClientControl = Ping | Pong | ClientSessionEnd | ClientStats

SERVER_CONTROL_TYPES: Final = (
    SessionStart, SessionEnd, Latency, Error, Draining, Vad, Transcript, Ping, Pong
)
CLIENT_CONTROL_TYPES: Final = (Ping, Pong, ClientSessionEnd, ClientStats)


def _tags(types: tuple[type[_Control], ...]) -> frozenset[str]:
    return frozenset(str(t.__struct_config__.tag) for t in types)


SERVER_CONTROL_TAGS: Final = _tags(SERVER_CONTROL_TYPES)
CLIENT_CONTROL_TAGS: Final = _tags(CLIENT_CONTROL_TYPES)


def session_start(session_id: str, model: str, demo_weights: bool, max_sessions: int,
                  codec: str = "pcm", resume_token: str | None = None, resume_window_s: float = 0.0,
                  resume_gap_s: float | None = None) -> SessionStart:
    """A `SessionStart` for this protocol version and the audio formats of `codec` ("pcm" or "opus");
    `resume_gap_s` given: the start of a resumed session."""
    client_format, server_format = AUDIO_FORMATS[codec]
    return SessionStart(
        session_id=session_id,
        protocol_version=PROTOCOL_VERSION,
        input=client_format,
        output=server_format,
        model=model,
        demo_weights=demo_weights,
        max_sessions=max_sessions,
        resume_token=resume_token,
        resume_window_s=resume_window_s if resume_token is not None else 0.0,
        resumed=resume_gap_s is not None,
        resume_gap_s=resume_gap_s,
    )


__all__ = [
    "AUDIO_FORMATS",
    "CLIENT_AUDIO_FORMAT",
    "CLIENT_CONTROL_TAGS",
    "CLIENT_CONTROL_TYPES",
    "CLIENT_OPUS_FORMAT",
    "SERVER_AUDIO_FORMAT",
    "SERVER_CONTROL_TAGS",
    "SERVER_CONTROL_TYPES",
    "SERVER_OPUS_FORMAT",
    "AudioFormat",
    "ClientControl",
    "ClientSessionEnd",
    "Draining",
    "Error",
    "Latency",
    "LatencyBreakdown",
    "MessageId",
    "Ping",
    "Pong",
    "ServerControl",
    "SessionEnd",
    "SessionStart",
    "Transcript",
    "Vad",
    "session_start",
]
