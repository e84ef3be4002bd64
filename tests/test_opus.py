"""Opus on the wire (`/ws?codec=opus`): the codec and its checks alone, the session's rules sans I/O, then the
real server (loopback engine) over loopback WebSockets with Telugu speech at real-time pace."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from procs.client import ClientRun, messages_until_closed, stream_client
from procs.config import ServerConfig
from procs.frames import ModelFrame
from procs.network.codec import UP_BITRATE, OpusDecoder, OpusEncoder, SessionCodec, requested_codec
from procs.network.http import HttpRoutes
from procs.network.session import PublishAudio, Session, SessionRules
from procs.network.wires import AudioOut, OpusWire
from protocol import (
    CLIENT_OPUS,
    IN_FRAME_BYTES,
    IN_RATE,
    MAX_OPUS_PACKET_BYTES,
    OUT_RATE,
    EndReason,
    Error,
    ErrorCode,
    ProtocolError,
    SessionStart,
    decode_client_opus,
    decode_server,
    decode_server_opus,
    encode_client_audio,
    encode_client_opus,
    encode_server_opus,
    session_start,
)
from tests.support.helpers import assert_real_time
from tests.support.launcher import ServerProcess
from tests.support.speech import telugu_speech_16k

# Listen until every frame sent is answered (the loopback engine answers each), 5 s at most.
ALL_BACK = {"until_frames": -1, "tail_s": 5.0}
pytestmark = pytest.mark.loopback_server("--max-sessions", "3")



def speech_packets(seconds: float = 1.0) -> list[bytes]:
    pcm = telugu_speech_16k()[: int(seconds * IN_RATE)]
    encoder = OpusEncoder(IN_RATE, UP_BITRATE)
    return [encoder.encode(pcm[i : i + 320].tobytes()) for i in range(0, len(pcm) - 319, 320)]


def ten_ms_packet() -> bytes:
    encoder = OpusEncoder(IN_RATE, UP_BITRATE)
    # libopus takes 10 ms frames too; such a packet is valid Opus of the wrong duration for this wire.
    import opuslib_next.api.encoder as enc

    return enc.encode(encoder._state, np.zeros(160, np.int16).tobytes(), 160, MAX_OPUS_PACKET_BYTES)


# Each is a binary frame an Opus session must refuse, and the error code it gets.
BAD_FRAMES: dict[str, tuple[bytes, ErrorCode]] = {
    "prefix only (empty packet)": (bytes([CLIENT_OPUS]), ErrorCode.BAD_LENGTH),
    "oversized packet": (bytes([CLIENT_OPUS]) + b"\x08" * (MAX_OPUS_PACKET_BYTES + 1), ErrorCode.BAD_LENGTH),
    "invalid table of contents": (bytes([CLIENT_OPUS, 0x03, 0xFF]), ErrorCode.BAD_AUDIO),
    "a PCM frame in an Opus session": (encode_client_audio(bytes(IN_FRAME_BYTES)), ErrorCode.BAD_HEADER),
}


# --- the codec and the wire, alone ----------------------------------------------------------------------


def test_requested_codec() -> None:
    assert requested_codec("/ws") == "pcm"
    assert requested_codec("/ws?token=abc") == "pcm"
    assert requested_codec("/ws?codec=pcm") == "pcm"
    assert requested_codec("/ws?token=a&codec=opus") == "opus"
    for path in ("/ws?codec=mp3", "/ws?codec=", "/ws?codec=opus&codec=pcm", "/ws?codec=OPUS"):
        with pytest.raises(ValueError):
            requested_codec(path)


def test_opus_frames_on_the_wire() -> None:
    packet = speech_packets(0.1)[0]
    assert bytes(decode_client_opus(encode_client_opus(packet))) == packet
    assert bytes(decode_server_opus(encode_server_opus(packet))) == packet
    for size in (0, MAX_OPUS_PACKET_BYTES + 1):
        with pytest.raises(ValueError):
            encode_server_opus(b"\x08" * size)
    with pytest.raises(ProtocolError) as refused:
        decode_client_opus(encode_server_opus(packet))  # the server's prefix, from a client
    assert refused.value.code is ErrorCode.BAD_HEADER


def test_codec_round_trip_and_bad_packets() -> None:
    codec = SessionCodec()
    pcm = b"".join(bytes(codec.decode(memoryview(p))) for p in speech_packets(1.0))
    assert len(pcm) == 50 * IN_FRAME_BYTES
    assert np.abs(np.frombuffer(pcm, np.int16)).max() > 1000  # speech, not silence
    for packet in (b"", b"\xff", b"\x03\xff", ten_ms_packet()):
        with pytest.raises(ProtocolError) as refused:
            codec.decode(memoryview(packet))
        assert refused.value.code is ErrorCode.BAD_AUDIO
    assert len(codec.decode(memoryview(speech_packets(0.1)[1]))) == IN_FRAME_BYTES  # still decodes after them
    down = codec.encode(np.zeros(480, np.int16).tobytes())
    assert 1 <= len(down) <= MAX_OPUS_PACKET_BYTES
    assert len(OpusDecoder(OUT_RATE).decode(down)) == 960
    codec.close()
    codec.close()  # closing twice is harmless (the session closes it once its connection is gone)


def test_http_refuses_an_unknown_codec_in_the_handshake(tmp_path) -> None:
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    routes = HttpRoutes(tmp_path, health=lambda: None, metrics=lambda: "", websocket_refusal=lambda: None)
    refused = routes.respond(Request("/ws?codec=mp3", Headers({"Host": "localhost"})))
    assert refused is not None and refused.status_code == 400
    assert b"unknown codec" in refused.body
    assert routes.respond(Request("/ws?codec=opus", Headers({"Host": "localhost"}))) is None


# --- the session's rules, sans I/O ----------------------------------------------------------------------


def opus_session() -> OpusWire:
    """An Opus session behind its edge, as the server holds it: `/ws?codec=opus` in, Opus out."""
    session = Session(session_start("s1", "m", False, 2, codec="opus"), slot=0, gen=1, now=0.0)
    return OpusWire(session, SessionCodec())


def test_opus_session_decodes_before_the_rings_and_encodes_for_the_client() -> None:
    wire = opus_session()
    session = wire.session
    start = decode_server(wire.next_outgoing(0))
    assert isinstance(start, SessionStart)
    assert (start.input.encoding, start.input.prefix, start.input.sample_rate) == ("opus", 0x03, 16000)
    assert (start.output.encoding, start.output.prefix, start.output.sample_rate) == ("opus", 0x04, 24000)
    assert start.input.frame_ms == start.output.frame_ms == 20
    assert start.input.frame_bytes == MAX_OPUS_PACKET_BYTES
    actions = wire.receive(encode_client_opus(speech_packets(0.1)[0]), 10_000_000)
    assert len(actions) == 1 and isinstance(actions[0], PublishAudio)
    assert actions[0].pcm.nbytes == IN_FRAME_BYTES  # what the rings take, as from a PCM client
    frame = ModelFrame(seq=0, t_in_ns=0, gen=1, block_pos=0, queue_us=0, step_us=0, resample_us=0,
                       dropped=0, realigned=0, pcm=np.zeros(480, np.int16).tobytes())
    session.model_audio(frame)
    out = wire.next_outgoing(20_000_000)
    assert isinstance(out, AudioOut) and out.data[0] == 0x04
    assert len(OpusDecoder(OUT_RATE).decode(decode_server_opus(out.data))) == 960


def test_bad_packets_are_answered_and_counted_and_the_session_goes_on() -> None:
    wire = opus_session()
    session = wire.session
    wire.next_outgoing(0)
    t_ns = 0
    for data, code in BAD_FRAMES.values():
        t_ns += 20_000_000
        assert wire.receive(data, t_ns) == []
        error = decode_server(wire.next_outgoing(t_ns))
        assert isinstance(error, Error) and error.code == code and not error.fatal
    assert session.counters.malformed == len(BAD_FRAMES)
    actions = wire.receive(encode_client_opus(speech_packets(0.1)[0]), t_ns + 20_000_000)
    assert isinstance(actions[0], PublishAudio)
    # A flood of them ends the session like any malformed flood: 1008, one Release.
    released = []
    for i in range(session.rules.garbage_limit):
        released += wire.receive(bytes([CLIENT_OPUS, 0x03, 0xFF]), t_ns + (i + 2) * 1_000_000)
    assert len(released) == 1 and session.close is not None and session.close.code == 1008
    session.connection_closed(EndReason.CLIENT_CLOSED, 0.0)
    wire.close()  # the server's, with the connection (procs/network/server.py)
    assert wire.codec.decoder._state is None  # freed with the connection


def test_a_packet_refused_by_the_rate_limit_is_never_decoded() -> None:
    """The edge frames a packet; the session decodes it only once its rate limit admits the frame, so a
    flood costs no libopus work beyond the burst: packets that do not decode are counted malformed only
    while admitted, the rest as rate-limited."""
    session = Session(session_start("s1", "m", False, 2, codec="opus"), slot=0, gen=1, now=0.0,
                      rules=dataclasses.replace(SessionRules.of(ServerConfig()), garbage_limit=10_000,
                                                rate_close_after=10_000))
    wire = OpusWire(session, SessionCodec())
    burst = int(session.rules.rate_burst_frames)
    for _ in range(burst + 30):  # all at once: the bucket admits its burst, then refuses
        wire.receive(bytes([CLIENT_OPUS, 0x03, 0xFF]), 0)
    assert session.counters.malformed == burst  # each admitted one failed to decode
    assert session.counters.input_rate_limited == 30  # the refused ones never reached the decoder


# --- the real server -------------------------------------------------------------------------------------


def best_correlation(sent16: np.ndarray, got24: np.ndarray, max_lag: int = 600) -> float:
    """Highest correlation of what came back with what was sent (resampled to 24 kHz), over the lags a
    round trip can add (the codec's look-ahead, the resampler's delay)."""
    x = sent16.astype(np.float64)
    ref = np.fft.irfft(np.fft.rfft(x), n=len(x) * 3 // 2) * 1.5
    got = got24.astype(np.float64)
    n = min(len(ref), len(got)) - max_lag
    return max(np.corrcoef(ref[:n], got[lag : lag + n])[0, 1] for lag in range(max_lag))


def test_opus_round_trip_through_the_loopback_engine(loopback_server: ServerProcess, speech) -> None:
    run = asyncio.run(stream_client(loopback_server.ws_url, speech, tail_s=5.0,
                                    until_frames=len(speech) // 320, codec="opus"))
    assert run.session_start is not None
    assert run.session_start.input.encoding == run.session_start.output.encoding == "opus"
    assert (run.session_start.input.prefix, run.session_start.output.prefix) == (0x03, 0x04)
    assert_real_time(run)
    assert run.close_code == 1000 and not run.of_type(Error)
    assert len(run.frames) == len(speech) // 320, "every frame comes back exactly once"
    assert best_correlation(speech, run.pcm()) > 0.8  # lossy, but the same speech
    # A twelfth of PCM's bytes or less each way (PCM: 641 up, 961 down per frame).
    assert run.audio_bytes_up < 641 * run.sent / 8
    assert run.audio_bytes_down < 961 * len(run.frames) / 8


def test_pcm_stays_the_default(loopback_server: ServerProcess, speech) -> None:
    run = asyncio.run(stream_client(loopback_server.ws_url, speech[: IN_RATE], **ALL_BACK))
    assert run.session_start is not None
    assert (run.session_start.input.encoding, run.session_start.input.prefix) == ("pcm_s16le", 0x01)
    assert (run.session_start.output.encoding, run.session_start.output.prefix) == ("pcm_s16le", 0x02)
    assert run.frames and run.audio_bytes_down == 961 * len(run.frames)


def test_an_unknown_codec_is_refused_in_the_handshake(loopback_server: ServerProcess) -> None:
    async def attempt() -> int:
        try:
            async with connect(loopback_server.ws_url + "?codec=mp3") as ws:
                await messages_until_closed(ws)
        except InvalidStatus as refused:
            return refused.response.status_code
        return 101

    assert asyncio.run(attempt()) == 400


def test_bad_packets_get_errors_and_a_flood_closes_only_that_session(loopback_server: ServerProcess,
                                                                     speech) -> None:
    pcm = speech[: 3 * IN_RATE]
    bad = {10 + 5 * i: [data] for i, (data, _) in enumerate(BAD_FRAMES.values())}
    bad[40] = [encode_client_opus(ten_ms_packet())]
    flood = {i: [bytes([CLIENT_OPUS, 0x03, 0xFF])] * 2 for i in range(10, 60)}

    async def three() -> list[ClientRun]:
        return list(await asyncio.gather(
            stream_client(loopback_server.ws_url, pcm, codec="opus", inject=bad, **ALL_BACK),
            stream_client(loopback_server.ws_url, pcm, codec="opus", **ALL_BACK),
            stream_client(loopback_server.ws_url, pcm, codec="opus", inject=flood, **ALL_BACK),
        ))

    answered, neighbour, flooder = asyncio.run(three())
    codes = [m.code for m in answered.of_type(Error)]
    assert sorted(codes) == sorted([code for _, code in BAD_FRAMES.values()] + [ErrorCode.BAD_AUDIO])
    assert not any(m.fatal for m in answered.of_type(Error))
    assert answered.close_code == 1000
    assert_real_time(answered)
    assert any(t > answered.t_first_send + 2.0 for t, _ in answered.frames)  # it went on after them
    assert_real_time(neighbour)
    assert neighbour.close_code == 1000 and not neighbour.of_type(Error)
    assert flooder.close_code == 1008
    assert flooder.of_type(Error)[-1].fatal
    assert loopback_server.proc.poll() is None  # no process went down
