"""Opus on the wire, per session: the codec a client asked for at connect time, and its state.

A client asks for Opus with `/ws?codec=opus` (a query parameter because a browser cannot set headers on a
WebSocket); no `codec` (or `codec=pcm`) keeps the seed's PCM. Any other value is refused in the handshake
with HTTP 400, before a slot is taken (`requested_codec`, called by `procs/network/http.py`).

An Opus session decodes each client packet to 16 kHz PCM as it arrives (`SessionCodec.decode`, from
`Session.receive`), so the rings, the VAD and the model see exactly the 640-byte frames of a PCM session,
and encodes each 24 kHz model frame as it is queued for the client (`SessionCodec.encode`). A packet that
is not one 20 ms frame raises `ProtocolError(BAD_AUDIO)`: the session answers `error` and counts it toward
its malformed-message limit, like any bad frame.

libopus through `opuslib-next` (ctypes over the system's libopus: `apt-get install libopus0`). Its
high-level `Encoder`/`Decoder` build a fresh ctypes array and a Python list per call; this calls the same
library functions with buffers allocated once per session, which is what makes it cheap enough for the
network process's one thread (bench/opus_cost.py measures it).
"""

from __future__ import annotations

import ctypes
from typing import Final
from urllib.parse import parse_qs, urlsplit

import opuslib_next
import opuslib_next.api.ctl as opus_ctl
import opuslib_next.api.decoder as opus_dec
import opuslib_next.api.encoder as opus_enc

from protocol import (
    CODECS,
    IN_FRAME_SAMPLES,
    IN_RATE,
    MAX_OPUS_PACKET_BYTES,
    OUT_FRAME_SAMPLES,
    OUT_RATE,
    ErrorCode,
    ProtocolError,
)

# Model speech down at 24 kHz: 32 kbit/s is Opus's "fullband speech" region (RFC 7587 §3.1.1 recommends
# 28-40 kbit/s), a twelfth of PCM's 384 kbit/s. The page encodes its 16 kHz microphone at 24 kbit/s
# (wideband speech: 16-20 kbit/s is transparent-ish, a margin for Telugu's retroflexes and sibilants).
DOWN_BITRATE: Final = 32_000
UP_BITRATE: Final = 24_000
_APPLICATION: Final = opuslib_next.APPLICATION_VOIP  # speech: SILK/hybrid modes, tuned for intelligibility


def requested_codec(path: str) -> str:
    """The codec a `/ws` request path asks for ("pcm" when it names none). ValueError, with a message fit
    for the client, for an unknown or repeated `codec` parameter."""
    values = parse_qs(urlsplit(path).query, keep_blank_values=True).get("codec", [])
    if not values:
        return CODECS[0]
    if len(values) > 1:
        raise ValueError("codec given more than once")
    if values[0] not in CODECS:
        raise ValueError(f"unknown codec {values[0][:32]!r}; this server speaks {', '.join(CODECS)}")
    return values[0]


class _LibopusState:
    """A libopus encoder or decoder state, freed once: by `close`, or when the object goes."""

    _state: object | None
    _destroy: staticmethod

    def close(self) -> None:
        if self._state is not None:
            self._destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


class OpusEncoder(_LibopusState):
    """20 ms mono s16le frames at `rate` -> one Opus packet each."""

    _destroy = staticmethod(opus_enc.destroy)

    def __init__(self, rate: int, bitrate: int) -> None:
        self.samples = rate * 20 // 1000
        self._state = opus_enc.create_state(rate, 1, _APPLICATION)
        opus_enc.encoder_ctl(self._state, opus_ctl.set_bitrate, bitrate)
        self._pcm = (ctypes.c_int16 * self.samples)()
        self._pcm_bytes = memoryview(self._pcm).cast("B")
        self._pcm_ptr = ctypes.cast(self._pcm, opuslib_next.api.c_int16_pointer)
        self._out = ctypes.create_string_buffer(MAX_OPUS_PACKET_BYTES)

    def encode(self, pcm: bytes | memoryview) -> bytes:
        """One packet of 1..MAX_OPUS_PACKET_BYTES bytes. ValueError for a frame of the wrong size."""
        if self._state is None:
            raise ValueError("encoder closed")
        if memoryview(pcm).nbytes != 2 * self.samples:
            raise ValueError(f"expected {2 * self.samples} PCM bytes, got {memoryview(pcm).nbytes}")
        self._pcm_bytes[:] = pcm
        size = opus_enc.libopus_encode(self._state, self._pcm_ptr, self.samples, self._out,
                                       MAX_OPUS_PACKET_BYTES)
        if size < 0:  # only a programming error can make libopus refuse a frame of the right size
            raise opuslib_next.OpusError(size)
        return self._out.raw[:size]


class OpusDecoder(_LibopusState):
    """One Opus packet -> exactly one 20 ms mono s16le frame at `rate`, or `ProtocolError(BAD_AUDIO)`."""

    _destroy = staticmethod(opus_dec.destroy)

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.samples = rate * 20 // 1000
        self._state = opus_dec.create_state(rate, 1)
        # Room for the longest packet (120 ms): a packet of another duration is refused, but libopus is told
        # the true size of the buffer, so nothing it does can write past it.
        self._capacity = rate * 120 // 1000
        self._pcm = (ctypes.c_int16 * self._capacity)()
        self._pcm_ptr = ctypes.cast(self._pcm, opuslib_next.api.c_int16_pointer)

    def decode(self, packet: bytes | memoryview) -> bytes:
        if self._state is None:
            raise ProtocolError(ErrorCode.BAD_AUDIO, "decoder closed")
        data = bytes(packet)
        if not data:  # libopus would take an empty packet as a lost one and conceal it
            raise ProtocolError(ErrorCode.BAD_AUDIO, "empty Opus packet")
        # The duration is in the packet's table of contents: check it before the decoder's state moves.
        samples = opus_dec.libopus_get_nb_samples(self._state, data, len(data))
        if samples < 0:
            raise ProtocolError(ErrorCode.BAD_AUDIO, "not an Opus packet (its table of contents is invalid)")
        if samples != self.samples:
            raise ProtocolError(ErrorCode.BAD_AUDIO, f"Opus packet holds {samples * 1000 / self.rate:g} ms, "
                                "expected 20 ms")
        got = opus_dec.libopus_decode(self._state, data, len(data), self._pcm_ptr, self._capacity, 0)
        if got != self.samples:
            raise ProtocolError(ErrorCode.BAD_AUDIO, f"Opus packet does not decode (libopus error {got})")
        return bytes(memoryview(self._pcm).cast("B")[: 2 * self.samples])


class SessionCodec:
    """An Opus session's codec state on the server: the client's 16 kHz packets in, the model's 24 kHz
    frames out. Created when the session opens, closed when its connection is gone."""

    def __init__(self, down_bitrate: int = DOWN_BITRATE) -> None:
        self.decoder = OpusDecoder(IN_RATE)
        self.encoder = OpusEncoder(OUT_RATE, down_bitrate)
        assert self.decoder.samples == IN_FRAME_SAMPLES and self.encoder.samples == OUT_FRAME_SAMPLES

    def decode(self, packet: memoryview) -> memoryview:
        """640 bytes of 16 kHz PCM; `ProtocolError(BAD_AUDIO)` for a packet that is not 20 ms of Opus."""
        return memoryview(self.decoder.decode(packet))

    def encode(self, pcm: bytes) -> bytes:
        return self.encoder.encode(pcm)

    def close(self) -> None:
        self.decoder.close()
        self.encoder.close()
