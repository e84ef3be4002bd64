"""Our `/ws` wire's edge (procs/network/wires.py): client messages decoded into a session's typed input, its
typed outbox encoded for the socket; no socket, no event loop."""

from __future__ import annotations

from procs.frames import ModelFrame
from procs.network.codec import OpusDecoder
from procs.network.quality import QualityReport
from procs.network.session import ClientAudio, Close, Session
from procs.network.wires import AudioOut, OpusWire, PcmWire, decode_ws, ws_wire
from protocol import (
    IN_FRAME_BYTES,
    OUT_FRAME_BYTES,
    OUT_RATE,
    EndReason,
    ErrorCode,
    Ping,
    Pong,
    ProtocolError,
    SessionEnd,
    SessionStart,
    decode_server,
    decode_server_opus,
    encode_client_audio,
    encode_client_control,
    session_start,
)

MS = 1_000_000


def new_session(codec: str = "pcm") -> Session:
    return Session(session_start("s1", model="m", demo_weights=False, max_sessions=2, codec=codec), slot=0,
                   gen=1, now=0.0)


def model_frame(fill: int, block_pos: int = 0) -> ModelFrame:
    return ModelFrame(seq=0, t_in_ns=0, gen=1, block_pos=block_pos, queue_us=0, step_us=0, resample_us=0,
                      dropped=0, realigned=0, pcm=bytes([fill]) * OUT_FRAME_BYTES)


def test_a_ws_message_decodes_to_the_sessions_typed_input_and_never_raises() -> None:
    pcm = bytes(range(256)) * 2 + bytes(128)
    audio = decode_ws(encode_client_audio(pcm))
    assert isinstance(audio, ClientAudio) and audio.decode is None and bytes(audio.data) == pcm
    assert decode_ws(encode_client_control(Ping(id=3, t_ms=1.0))) == Ping(id=3, t_ms=1.0)
    refused = decode_ws(b"\x07" + bytes(IN_FRAME_BYTES))
    assert isinstance(refused, ProtocolError) and refused.code is ErrorCode.BAD_HEADER
    assert isinstance(decode_ws("not json"), ProtocolError)


def test_the_pcm_edge_encodes_the_outbox_for_the_socket_in_the_sessions_order() -> None:
    wire = ws_wire(new_session(), "pcm")
    assert type(wire) is PcmWire
    session = wire.session
    wire.receive(encode_client_audio(bytes(IN_FRAME_BYTES)), 0)
    wire.receive(encode_client_control(Ping(id=1, t_ms=2.0)), MS)
    session.model_audio(model_frame(fill=7))
    session.tick(1.0)  # a quality report: handed over as it is, for the server's metrics
    session.shutdown()
    out = []
    while (item := wire.next_outgoing(3 * MS)) is not None:
        out.append(item)
    assert isinstance(out[0], QualityReport)
    start, pong, audio, goodbye, close = out[1:]
    assert isinstance(start, str) and isinstance(decode_server(start), SessionStart)
    assert decode_server(pong) == Pong(id=1, t_ms=2.0)
    assert isinstance(audio, AudioOut) and audio.data == b"\x02" + bytes([7]) * OUT_FRAME_BYTES
    assert audio.latency_s is not None  # the first frame of a block: its latency goes to the metrics
    assert decode_server(goodbye) == SessionEnd(reason="server_shutdown", frames_in=1, frames_out=1)
    assert close == Close(1001, "server shutting down")


def test_the_opus_edge_encodes_model_audio_as_it_leaves_and_frees_libopus_at_close() -> None:
    wire = ws_wire(new_session("opus"), "opus")
    assert isinstance(wire, OpusWire)
    assert isinstance(decode_server(wire.next_outgoing(0)), SessionStart)
    for k in range(3):
        wire.session.model_audio(model_frame(fill=0, block_pos=k))
    packets = [wire.next_outgoing(0) for _ in range(3)]
    assert all(isinstance(p, AudioOut) and p.data[0] == 0x04 for p in packets)
    back = OpusDecoder(OUT_RATE)
    assert all(len(back.decode(decode_server_opus(p.data))) == OUT_FRAME_BYTES for p in packets)
    wire.session.connection_closed(EndReason.CLIENT_CLOSED, 0.0)
    wire.close()
    assert wire.codec.encoder._state is None and wire.codec.decoder._state is None
