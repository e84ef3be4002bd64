"""Sans-I/O encoding and decoding of WebSocket frames.

Everything here is a pure function of its input: no sockets, no clocks, no state. The server calls
the `decode_client*` and `encode_server*` functions; the client-side twins exist for tests,
benchmarks and bots.

Decoders accept untrusted input: given a str or a bytes-like object, they return a typed value or
raise `ProtocolError`; nothing else escapes. (Other argument types are programming errors and get
a TypeError.) Checks run in a fixed order and the first failing check names the error code:

- binary frames: EMPTY_FRAME (no bytes) -> BAD_HEADER (first byte is not this direction's prefix)
  -> BAD_LENGTH (not prefix + exactly one 20 ms frame; Opus: not prefix + 1..MAX_OPUS_PACKET_BYTES);
  whether an Opus packet decodes to 20 ms (BAD_AUDIO) is the codec's check (procs/network/codec.py);
- text frames: EMPTY_FRAME (no characters) -> OVERSIZE (more than MAX_TEXT_BYTES bytes of UTF-8)
  -> BAD_UTF8 (bytes that are not UTF-8, or a str with lone surrogates) -> BAD_JSON (malformed,
  nested too deeply, a number beyond float range, or not a JSON object) -> BAD_FIELD (no "type"
  field, or not a string) -> UNKNOWN_TYPE ("type" is not a message this direction carries)
  -> BAD_FIELD (a field is missing, mistyped or out of range). Unknown extra fields are ignored.

websockets delivers binary frames as `bytes` and text frames as `str`; `decode_client` and
`decode_server` dispatch on exactly that.
"""

from typing import Final

import msgspec

from protocol.codes import ErrorCode
from protocol.constants import (
    CLIENT_AUDIO,
    CLIENT_OPUS,
    IN_FRAME_BYTES,
    MAX_OPUS_PACKET_BYTES,
    MAX_TEXT_BYTES,
    OUT_FRAME_BYTES,
    SERVER_AUDIO,
    SERVER_OPUS,
)
from protocol.errors import ProtocolError
from protocol.messages import (
    CLIENT_CONTROL_TAGS,
    CLIENT_CONTROL_TYPES,
    SERVER_CONTROL_TAGS,
    SERVER_CONTROL_TYPES,
    ClientControl,
    ServerControl,
)

Buffer = bytes | bytearray | memoryview

# Stateless codec objects, built once because building them compiles the type's schema.
_JSON_ENCODER: Final = msgspec.json.Encoder()
_CLIENT_CONTROL_DECODER: Final = msgspec.json.Decoder(ClientControl)
_SERVER_CONTROL_DECODER: Final = msgspec.json.Decoder(ServerControl)
_ANY_JSON_DECODER: Final = msgspec.json.Decoder()

_CLIENT_PREFIX: Final = bytes([CLIENT_AUDIO])
_SERVER_PREFIX: Final = bytes([SERVER_AUDIO])
_CLIENT_OPUS_PREFIX: Final = bytes([CLIENT_OPUS])
_SERVER_OPUS_PREFIX: Final = bytes([SERVER_OPUS])
# Buffer formats accepted as PCM by the encoders: raw bytes or native/little-endian int16
# (numpy int16 arrays export "h"). Anything else has the right size only by accident.
_PCM_FORMATS: Final = frozenset({"B", "b", "c", "h", "<h", "=h"})
# A UTF-8 character is at most 4 bytes, so a str this short cannot exceed MAX_TEXT_BYTES.
_TEXT_CHARS_ALWAYS_FIT: Final = MAX_TEXT_BYTES // 4
# How much of an offending "type" value to quote back in an error message.
_QUOTE_CHARS: Final = 64


# --- audio --------------------------------------------------------------------------------------


def _prefixed(data: Buffer | str, prefix: int, kind: str) -> memoryview:
    """A binary frame as bytes, checked to be one and to start with `prefix` (`kind` names the encoding in
    the error, e.g. " (Opus)")."""
    if isinstance(data, str):
        raise ProtocolError(ErrorCode.BAD_HEADER, "expected a binary audio frame, got a text frame")
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if len(view) == 0:
        raise ProtocolError(ErrorCode.EMPTY_FRAME, "empty binary frame")
    if view[0] != prefix:
        raise ProtocolError(
            ErrorCode.BAD_HEADER, f"binary frame starts with 0x{view[0]:02x}, expected 0x{prefix:02x}{kind}"
        )
    return view


def _decode_audio(data: Buffer | str, prefix: int, pcm_bytes: int) -> memoryview:
    # Fast path for what websockets delivers, a well-formed `bytes` frame (~40% cheaper).
    if type(data) is bytes and len(data) == pcm_bytes + 1 and data[0] == prefix:
        return memoryview(data)[1:]
    view = _prefixed(data, prefix, "")
    size = len(view)
    if size != pcm_bytes + 1:
        raise ProtocolError(
            ErrorCode.BAD_LENGTH, f"binary frame has {size} bytes, expected {pcm_bytes + 1} (prefix + PCM)"
        )
    return view[1:]


def _encode_audio(prefix: bytes, pcm: Buffer, pcm_bytes: int) -> bytes:
    view = memoryview(pcm)
    if view.nbytes != pcm_bytes:
        raise ValueError(f"PCM frame has {view.nbytes} bytes, expected {pcm_bytes}")
    if view.format not in _PCM_FORMATS:
        raise ValueError(f"PCM must be bytes or little-endian int16, got buffer format {view.format!r}")
    return prefix + view


def decode_client_audio(data: Buffer) -> memoryview:
    """The 640 PCM bytes (20 ms, 16 kHz s16le) of a client audio frame, without copying.

    The view aliases `data`: it stays valid as long as `data` is not modified.
    """
    return _decode_audio(data, CLIENT_AUDIO, IN_FRAME_BYTES)


def decode_server_audio(data: Buffer) -> memoryview:
    """The 960 PCM bytes (20 ms, 24 kHz s16le) of a server audio frame, without copying."""
    return _decode_audio(data, SERVER_AUDIO, OUT_FRAME_BYTES)


def encode_server_audio(pcm: Buffer) -> bytes:
    """0x02 + 960 bytes of 24 kHz s16le PCM. ValueError unless `pcm` is exactly 960 bytes of int16/raw."""
    return _encode_audio(_SERVER_PREFIX, pcm, OUT_FRAME_BYTES)


def encode_client_audio(pcm: Buffer) -> bytes:
    """0x01 + 640 bytes of 16 kHz s16le PCM. ValueError unless `pcm` is exactly 640 bytes of int16/raw."""
    return _encode_audio(_CLIENT_PREFIX, pcm, IN_FRAME_BYTES)


def _decode_opus(data: Buffer | str, prefix: int) -> memoryview:
    view = _prefixed(data, prefix, " (Opus)")
    size = len(view)
    if not 2 <= size <= MAX_OPUS_PACKET_BYTES + 1:
        raise ProtocolError(
            ErrorCode.BAD_LENGTH,
            f"Opus frame has {size} bytes, expected prefix + 1..{MAX_OPUS_PACKET_BYTES} bytes of one packet",
        )
    return view[1:]


def _encode_opus(prefix: bytes, packet: Buffer) -> bytes:
    size = memoryview(packet).nbytes
    if not 1 <= size <= MAX_OPUS_PACKET_BYTES:
        raise ValueError(f"Opus packet has {size} bytes, expected 1..{MAX_OPUS_PACKET_BYTES}")
    return prefix + packet


def decode_client_opus(data: Buffer | str) -> memoryview:
    """The Opus packet of a client Opus frame (0x03 + packet), without copying. Whether it decodes to
    20 ms is not checked here: that takes a decoder."""
    return _decode_opus(data, CLIENT_OPUS)


def decode_server_opus(data: Buffer | str) -> memoryview:
    """The Opus packet of a server Opus frame (0x04 + packet), without copying."""
    return _decode_opus(data, SERVER_OPUS)


def encode_client_opus(packet: Buffer) -> bytes:
    """0x03 + one Opus packet (1..MAX_OPUS_PACKET_BYTES bytes). ValueError otherwise."""
    return _encode_opus(_CLIENT_OPUS_PREFIX, packet)


def encode_server_opus(packet: Buffer) -> bytes:
    """0x04 + one Opus packet (1..MAX_OPUS_PACKET_BYTES bytes). ValueError otherwise."""
    return _encode_opus(_SERVER_OPUS_PREFIX, packet)


# --- control ------------------------------------------------------------------------------------


def _checked_text(data: str | Buffer) -> str:
    """The frame as a str once it passed the empty, size and UTF-8 checks."""
    if isinstance(data, str):
        chars = len(data)
        if chars == 0:
            raise ProtocolError(ErrorCode.EMPTY_FRAME, "empty text frame")
        if chars > MAX_TEXT_BYTES:
            raise ProtocolError(ErrorCode.OVERSIZE, f"text frame over {MAX_TEXT_BYTES} bytes")
        if chars > _TEXT_CHARS_ALWAYS_FIT:
            try:
                size = len(data.encode("utf-8"))
            except UnicodeEncodeError as exc:
                raise ProtocolError(ErrorCode.BAD_UTF8, f"text is not valid Unicode: {exc.reason}") from None
            if size > MAX_TEXT_BYTES:
                raise ProtocolError(ErrorCode.OVERSIZE, f"text frame has {size} bytes, max {MAX_TEXT_BYTES}")
        return data
    size = memoryview(data).nbytes
    if size == 0:
        raise ProtocolError(ErrorCode.EMPTY_FRAME, "empty text frame")
    if size > MAX_TEXT_BYTES:
        raise ProtocolError(ErrorCode.OVERSIZE, f"text frame has {size} bytes, max {MAX_TEXT_BYTES}")
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            ErrorCode.BAD_UTF8, f"text frame is not UTF-8 (byte {exc.start}: {exc.reason})"
        ) from None


def _classify_failure(text: str, tags: frozenset[str], failure: Exception) -> ProtocolError:
    """Name what is wrong with a text frame the typed decoder refused (the slow, error-only path)."""
    if isinstance(failure, UnicodeError):  # a str with lone surrogates has no UTF-8 form
        return ProtocolError(ErrorCode.BAD_UTF8, "text is not valid Unicode")
    try:
        value = _ANY_JSON_DECODER.decode(text)
    except RecursionError:
        return ProtocolError(ErrorCode.BAD_JSON, "JSON is nested too deeply")
    except (msgspec.DecodeError, UnicodeError) as exc:
        return ProtocolError(ErrorCode.BAD_JSON, str(exc))
    if not isinstance(value, dict):
        return ProtocolError(
            ErrorCode.BAD_JSON, f"a control frame must be a JSON object, not {type(value).__name__}"
        )
    if "type" not in value:
        return ProtocolError(ErrorCode.BAD_FIELD, "missing required field `type`")
    kind = value["type"]
    if not isinstance(kind, str):
        return ProtocolError(ErrorCode.BAD_FIELD, "field `type` must be a string")
    if kind not in tags:
        return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:_QUOTE_CHARS]!r}")
    if isinstance(failure, RecursionError):
        return ProtocolError(ErrorCode.BAD_FIELD, "a field is nested too deeply")
    return ProtocolError(ErrorCode.BAD_FIELD, str(failure))


def _decode_control(
    data: str | Buffer, decoder: msgspec.json.Decoder, tags: frozenset[str]
) -> ClientControl | ServerControl:
    text = _checked_text(data)
    try:
        return decoder.decode(text)  # the fast path: one typed parse
    except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        raise _classify_failure(text, tags, exc) from None


def decode_client_control(data: str | Buffer) -> ClientControl:
    """A client control message (`Ping`, `Pong`, `ClientSessionEnd` or `ClientStats`) from a text frame."""
    return _decode_control(data, _CLIENT_CONTROL_DECODER, CLIENT_CONTROL_TAGS)  # type: ignore[return-value]


def decode_server_control(data: str | Buffer) -> ServerControl:
    """A server control message from a text frame (client side)."""
    return _decode_control(data, _SERVER_CONTROL_DECODER, SERVER_CONTROL_TAGS)  # type: ignore[return-value]


def encode_server_control(msg: ServerControl) -> str:
    """JSON text of a server control message. TypeError for anything that is not one."""
    if not isinstance(msg, SERVER_CONTROL_TYPES):
        raise TypeError(f"not a server control message: {type(msg).__name__}")
    return _JSON_ENCODER.encode(msg).decode("utf-8")


def encode_client_control(msg: ClientControl) -> str:
    """JSON text of a client control message. TypeError for anything that is not one."""
    if not isinstance(msg, CLIENT_CONTROL_TYPES):
        raise TypeError(f"not a client control message: {type(msg).__name__}")
    return _JSON_ENCODER.encode(msg).decode("utf-8")


# --- either kind of frame -----------------------------------------------------------------------


def decode_client(data: str | Buffer) -> memoryview | ClientControl:
    """Any client frame: a str is a text (control) frame, anything else a binary (audio) frame."""
    if isinstance(data, str):
        return decode_client_control(data)
    return decode_client_audio(data)


def decode_server(data: str | Buffer) -> memoryview | ServerControl:
    """Any server frame: a str is a text (control) frame, anything else a binary (audio) frame."""
    if isinstance(data, str):
        return decode_server_control(data)
    return decode_server_audio(data)
