"""Messages between our own processes (network, VAD, inference, supervisor).

msgspec Structs in one tagged union, encoded as msgpack arrays (`array_like`: the tag first, then
the fields in declaration order), which is compact and fast. To stay compatible between a newer and
an older process, only append fields, with defaults. Tags are the snake_case class names.

`slot` is the index of a session's row in the shared rings and in the model's batch; `gen` counts the
sessions a slot has held, so a message about a session that has since left its slot is recognised.
"""

from typing import Final, Literal

import msgspec

from protocol.codes import ErrorCode
from protocol.errors import ProtocolError


class _Internal(msgspec.Struct, tag_field="type", array_like=True, frozen=True):
    """Base of every internal message; subclasses set `tag=` to their snake_case name."""


class SessionOpen(_Internal, tag="session_open"):
    """A session was admitted into `slot`; `t_ns` is when (time.monotonic_ns of the sender)."""

    slot: int
    gen: int
    session_id: str
    t_ns: int


class SessionClose(_Internal, tag="session_close"):
    """The session in `slot` ended; its slot may be reused after every process has seen this."""

    slot: int
    gen: int
    session_id: str
    reason: str


class VadEvent(_Internal, tag="vad_event"):
    """Voice activity edge at `t_ms` on the session's audio clock."""

    slot: int
    gen: int
    session_id: str
    event: Literal["start", "end"]
    t_ms: float


class Transcript(_Internal, tag="transcript"):
    """Text the model produced for the session, at `t_ms` on its audio clock."""

    slot: int
    gen: int
    session_id: str
    text: str
    t_ms: float


class SlotError(_Internal, tag="slot_error"):
    """Something failed for one session; `code` is an `ErrorCode` value."""

    slot: int
    gen: int
    session_id: str
    code: str
    msg: str


class Ready(_Internal, tag="ready"):
    """A child process finished starting; `info` carries what it wants to tell (model name, ...)."""

    proc: str
    info: dict[str, str]


class StepStats(_Internal, tag="step_stats"):
    """One model step: its duration, batch size, and how long each frame waited for it."""

    step_s: float
    batch: int
    wait_s: list[float]


InternalMessage = SessionOpen | SessionClose | VadEvent | Transcript | SlotError | Ready | StepStats

# Stateless codec objects, built once because building them compiles the type's schema.
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(InternalMessage)


def encode_internal(msg: InternalMessage) -> bytes:
    """msgpack bytes of one internal message. TypeError for anything that is not one."""
    if not isinstance(msg, _Internal):
        raise TypeError(f"not an internal message: {type(msg).__name__}")
    return _ENCODER.encode(msg)


def decode_internal(data: bytes | bytearray | memoryview) -> InternalMessage:
    """The message encoded in `data`; ProtocolError(INTERNAL) if it is not a valid one."""
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        raise ProtocolError(ErrorCode.INTERNAL, f"bad internal message: {exc}") from None
