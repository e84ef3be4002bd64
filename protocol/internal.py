"""Messages between our own processes (network, VAD, inference, and the network's word to the supervisor).

msgspec Structs in one tagged union, encoded as msgpack arrays (`array_like`: the tag first, then
the fields in declaration order), which is compact and fast. To stay compatible between a newer and
an older process, only append fields, with defaults. Tags are the snake_case class names.

Names here never repeat the wire's (`protocol.messages`): `ModelText` becomes the wire's `Transcript`
and `VoiceActivity` the wire's `Vad` once the network process has matched them to a session.

`slot` is the index of a session's row in the shared rings and in the model's batch; `gen` counts the
sessions a slot has held, so a message about a session that has since left its slot is recognised.
"""

from typing import Final, Literal

import msgspec

from protocol.codes import EndReason, ErrorCode
from protocol.errors import ProtocolError


class _Internal(msgspec.Struct, tag_field="type", array_like=True, frozen=True):
    """Base of every internal message; subclasses set `tag=` to their snake_case name."""


# --- network -> workers ----------------------------------------------------------------------------


class SessionOpen(_Internal, tag="session_open"):
    """A session was admitted into `slot`. Workers learn its start from its first frame (rings are not
    ordered with respect to each other); this tells them its id, for their logs."""

    slot: int
    gen: int
    session_id: str


class SessionClose(_Internal, tag="session_close"):
    """The session in `slot` ended; frames of its generation are stale from now on."""

    slot: int
    gen: int
    reason: EndReason


class SessionDetached(_Internal, tag="session_detached"):
    """The session in `slot` lost its connection and waits to be resumed (`--resume-window`): it sends no
    audio meanwhile, so its model is not stepped and it must not be waited for; when it is resumed its
    frames come again and place it on the step clock anew, as a new session's would."""

    slot: int
    gen: int


# --- workers -> network ----------------------------------------------------------------------------


class VoiceActivity(_Internal, tag="voice_activity"):
    """Voice activity edge at `t_ms` on the session's audio clock."""

    slot: int
    gen: int
    event: Literal["start", "end"]
    t_ms: float


class ModelText(_Internal, tag="model_text"):
    """Inner-monologue text the model produced for the session, at `t_ms` on its audio clock."""

    slot: int
    gen: int
    text: str
    t_ms: float


class SlotError(_Internal, tag="slot_error"):
    """Something failed for one session."""

    slot: int
    gen: int
    code: ErrorCode
    msg: str


class InferenceReady(_Internal, tag="inference_ready"):
    """The inference process loaded its engine: what it serves, and how many sessions at once.

    `max_sessions` is how many sessions the engine holds (at most `--max-sessions`, fewer if its memory
    says so): the network admits exactly that many."""

    model: str
    demo_weights: bool
    max_sessions: int
    device: str


class VadReady(_Internal, tag="vad_ready"):
    """The VAD process is running."""

    model: str


class NetworkHello(_Internal, tag="network_hello"):
    """To the workers, from a network process that (re)started: forget every session, discard the audio
    queued for them, and say you are ready (again)."""


class WorkerDown(_Internal, tag="worker_down"):
    """From the supervisor to the network: a worker died or hung (and is being restarted, unless the server
    is stopping). `worker` is its place's name in the topology ("inference-1", "vad")."""

    worker: str
    why: str


class NetworkReady(_Internal, tag="network_ready"):
    """To the supervisor: the server is listening, every worker is ready; sessions can start."""

    host: str
    port: int
    model: str
    agent_port: int | None = None  # where the HAProxy agent check answers (`--agent-port`); None: off


class StepStats(_Internal, tag="step_stats"):
    """One model step: its duration, batch size, and how long each ready block waited for it."""

    step_s: float
    batch: int
    wait_s: list[float]


InternalMessage = (
    SessionOpen
    | SessionClose
    | SessionDetached
    | VoiceActivity
    | ModelText
    | SlotError
    | InferenceReady
    | VadReady
    | NetworkHello
    | WorkerDown
    | NetworkReady
    | StepStats
)

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
