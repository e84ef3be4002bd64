"""Our `/ws` wire at the edge of a session, sans I/O: client messages decoded into the session's typed
inputs, its typed outbox encoded for the socket.

A `Session` (procs/network/session.py) speaks no wire. Each connection has one edge object that does:
`PcmWire` for `/ws` (`0x01`/`0x02` + PCM), `OpusWire` for `/ws?codec=opus` (`0x03`/`0x04` + one Opus
packet, procs/network/codec.py), `MoshiAdapter` for moshi's `/api/chat` (kind byte + Ogg/Opus,
procs/network/moshi_api.py). The I/O layer (procs/network/server.py) talks to the edge only through the
`Wire` protocol below: `receive` a message, pull `next_outgoing` for the socket, `close` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from procs.network.codec import SessionCodec
from procs.network.quality import QualityReport
from procs.network.session import Action, ClientAudio, ClientInput, Close, ModelAudio, Session
from protocol import (
    ProtocolError,
    decode_client,
    decode_client_opus,
    encode_server_audio,
    encode_server_control,
    encode_server_opus,
)


@dataclass(frozen=True, slots=True)
class AudioOut:
    """One binary frame of model audio as its wire carries it, and the server-added latency it completes
    (for the metrics), if any."""

    data: bytes
    latency_s: float | None


# What the sender carries out: a message to send (text or binary), audio to send and time, the close, or a
# quality report to put into the metrics (the client never sees it).
WireOutgoing = str | bytes | AudioOut | Close | QualityReport


class Wire(Protocol):
    """One connection's edge: its session, and the translation between the session and one wire."""

    session: Session

    def receive(self, message: str | bytes, now_ns: int) -> list[Action]: ...

    def wants_to_send(self) -> bool: ...

    def next_outgoing(self, now_ns: int) -> WireOutgoing | None: ...

    def close(self) -> None: ...


def decode_ws(message: str | bytes) -> ClientInput:
    """A `/ws` client message (PCM audio or a control message) as the session's input; a message that does
    not decode becomes the `ProtocolError` that says why, which the session counts and answers."""
    try:
        decoded = decode_client(message)
    except ProtocolError as error:
        return error
    return ClientAudio(decoded) if isinstance(decoded, memoryview) else decoded


class PcmWire:
    """`/ws` with PCM both ways: `0x01` + 640 bytes of 16 kHz s16le in, `0x02` + 960 bytes of 24 kHz out,
    control messages as JSON text."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def decode(self, message: str | bytes) -> ClientInput:
        return decode_ws(message)

    def encode_audio(self, pcm: bytes) -> bytes:
        return encode_server_audio(pcm)

    def receive(self, message: str | bytes, now_ns: int) -> list[Action]:
        return self.session.receive(self.decode(message), now_ns)

    def wants_to_send(self) -> bool:
        return self.session.wants_to_send()

    def next_outgoing(self, now_ns: int) -> WireOutgoing | None:
        """The session's next outbox item encoded for this wire (the close, a quality report: as they are)."""
        item = self.session.next_outgoing(now_ns)
        if item is None or isinstance(item, Close | QualityReport):
            return item
        if isinstance(item, ModelAudio):
            return AudioOut(self.encode_audio(item.pcm), item.latency_s)
        return encode_server_control(item)

    def close(self) -> None:
        """Nothing to free: PCM keeps no state."""


class OpusWire(PcmWire):
    """`/ws?codec=opus`: each 20 ms frame one Opus packet both ways (`0x03` in, `0x04` out), control messages
    as on PCM. The client's packet is decoded only once the session admits the frame (`ClientAudio.decode`),
    to the same 640 bytes of PCM a PCM client sends: the rings never know."""

    def __init__(self, session: Session, codec: SessionCodec | None = None) -> None:
        super().__init__(session)
        self.codec = codec or SessionCodec()

    def decode(self, message: str | bytes) -> ClientInput:
        if isinstance(message, str):
            return decode_ws(message)
        try:
            packet = decode_client_opus(message)  # the framing only
        except ProtocolError as error:
            return error
        return ClientAudio(packet, self.codec.decode)

    def encode_audio(self, pcm: bytes) -> bytes:
        return encode_server_opus(self.codec.encode(pcm))

    def close(self) -> None:
        """libopus state is freed with the connection, not at a later GC."""
        self.codec.close()


def ws_wire(session: Session, codec: str) -> PcmWire:
    """The `/ws` edge for the codec the client asked for (procs/network/codec.py: `requested_codec`)."""
    return OpusWire(session) if codec == "opus" else PcmWire(session)
