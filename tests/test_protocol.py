"""Wire protocol: round trips, targeted error codes, check order, and fuzzing of every decoder."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    CLIENT_AUDIO,
    IN_FRAME_BYTES,
    IN_FRAME_SAMPLES,
    MAX_SAFE_INTEGER,
    MAX_TEXT_BYTES,
    OUT_FRAME_BYTES,
    OUT_FRAME_SAMPLES,
    SERVER_AUDIO,
    AudioFormat,
    ClientSessionEnd,
    Draining,
    Error,
    ErrorCode,
    Latency,
    LatencyBreakdown,
    Ping,
    Pong,
    ProtocolError,
    SessionEnd,
    SessionStart,
    Transcript,
    Vad,
    decode_client,
    decode_client_audio,
    decode_client_control,
    decode_server,
    decode_server_audio,
    decode_server_control,
    encode_client_audio,
    encode_client_control,
    encode_server_audio,
    encode_server_control,
)
from protocol.messages import CLIENT_CONTROL_TAGS, SERVER_CONTROL_TAGS

Decoder = Callable[[Any], Any]
ALL_DECODERS: list[Decoder] = [
    decode_client,
    decode_client_audio,
    decode_client_control,
    decode_server,
    decode_server_audio,
    decode_server_control,
]
TEXT_DECODERS: list[Decoder] = [decode_client, decode_client_control, decode_server, decode_server_control]

# --- strategies ---------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
ids = st.integers(min_value=0, max_value=MAX_SAFE_INTEGER)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
texts = st.text(max_size=200)

audio_formats = st.builds(
    AudioFormat,
    encoding=texts,
    sample_rate=ints,
    channels=ints,
    frame_ms=ints,
    frame_bytes=ints,
    prefix=ints,
)
server_messages = st.one_of(
    st.builds(
        SessionStart,
        session_id=texts,
        protocol_version=ints,
        input=audio_formats,
        output=audio_formats,
        model=texts,
        demo_weights=st.booleans(),
        max_sessions=ints,
    ),
    st.builds(SessionEnd, reason=texts, frames_in=ints, frames_out=ints),
    st.builds(
        Latency,
        ms=finite,
        breakdown=st.builds(
            LatencyBreakdown, queue_ms=finite, step_ms=finite, resample_ms=finite, transport_ms=finite
        ),
        p99_ms=finite,
        dropped_frames=ints,
        window_s=finite,
        realigned_frames=ints,
    ),
    st.builds(Error, code=st.sampled_from(ErrorCode), msg=texts, fatal=st.booleans()),
    st.builds(Draining, deadline_s=finite),
    st.builds(Vad, event=st.sampled_from(["start", "end"]), t_ms=finite),
    st.builds(Transcript, text=texts, t_ms=finite),
    st.builds(Ping, id=ids, t_ms=finite),
    st.builds(Pong, id=ids, t_ms=finite),
)
client_messages = st.one_of(
    st.builds(Ping, id=ids, t_ms=finite),
    st.builds(Pong, id=ids, t_ms=finite),
    st.builds(ClientSessionEnd, reason=texts),
)
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Objects with a plausible or junk "type" and a mix of real field names and random keys.
field_names = st.sampled_from(
    ["id", "t_ms", "reason", "code", "msg", "fatal", "event", "text", "ms", "breakdown", "session_id"]
)
random_objects = st.builds(
    lambda kind, fields: {**fields, "type": kind} if kind is not None else fields,
    st.one_of(st.none(), st.sampled_from(sorted(SERVER_CONTROL_TAGS)) | st.text(max_size=12), json_values),
    st.dictionaries(field_names | st.text(max_size=8), json_values, max_size=6),
)


@st.composite
def mutated_messages(draw: st.DrawFn) -> dict[str, Any]:
    """A real message as a JSON object, with up to two fields dropped, replaced or added."""
    obj: dict[str, Any] = msgspec.to_builtins(draw(server_messages | client_messages))
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        key = draw(st.sampled_from(sorted(obj)) | field_names)
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(json_values)
    return obj


json_objects = random_objects | mutated_messages()


def _code_of(decode: Decoder, data: Any) -> ErrorCode:
    with pytest.raises(ProtocolError) as caught:
        decode(data)
    return caught.value.code


def _decodes_or_refuses(decode: Decoder, data: Any) -> Any:
    """Decode, allowing only ProtocolError (with a code and a message) to come out."""
    try:
        return decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert isinstance(exc.msg, str)
        return exc


# --- constants ----------------------------------------------------------------------------------


def test_frame_constants_describe_20ms_of_s16le() -> None:
    assert (CLIENT_AUDIO, SERVER_AUDIO) == (0x01, 0x02)
    assert (IN_FRAME_SAMPLES, IN_FRAME_BYTES) == (320, 640)
    assert (OUT_FRAME_SAMPLES, OUT_FRAME_BYTES) == (480, 960)
    assert protocol.IN_RATE * protocol.FRAME_MS // 1000 == IN_FRAME_SAMPLES
    assert protocol.OUT_RATE * protocol.FRAME_MS // 1000 == OUT_FRAME_SAMPLES
    assert protocol.PROTOCOL_VERSION == 1


def test_error_codes_are_the_documented_strings() -> None:
    assert {code.value for code in ErrorCode} == {
        "bad_header", "bad_length", "bad_audio", "empty_frame", "oversize", "bad_utf8", "bad_json",
        "unknown_type", "bad_field", "capacity", "rate_limited", "internal", "shutdown", "bad_request",
        "idle_timeout", "time_limit", "resume_failed",
    }  # fmt: skip
    assert all(isinstance(code, str) and code == code.value for code in ErrorCode)


def test_message_tags_are_the_documented_names() -> None:
    server_tags = {"session_start", "session_end", "latency", "error", "draining", "vad", "transcript",
                   "ping", "pong"}
    assert server_tags == SERVER_CONTROL_TAGS
    assert {"ping", "pong", "session_end", "client_stats"} == CLIENT_CONTROL_TAGS


# --- round trips --------------------------------------------------------------------------------


@given(st.binary(min_size=IN_FRAME_BYTES, max_size=IN_FRAME_BYTES))
def test_client_audio_round_trip(pcm: bytes) -> None:
    frame = encode_client_audio(pcm)
    assert frame == b"\x01" + pcm
    assert decode_client(frame) == pcm
    assert decode_client_audio(bytearray(frame)) == pcm
    assert decode_client_audio(memoryview(frame)) == pcm


@given(st.binary(min_size=OUT_FRAME_BYTES, max_size=OUT_FRAME_BYTES))
def test_server_audio_round_trip(pcm: bytes) -> None:
    frame = encode_server_audio(pcm)
    assert frame == b"\x02" + pcm
    assert decode_server(frame) == pcm
    assert decode_server_audio(memoryview(frame)) == pcm


def test_audio_encoders_take_int16_arrays_and_decoders_do_not_copy() -> None:
    samples = np.arange(-160, 160, dtype=np.int16) * 97
    frame = encode_client_audio(samples)
    pcm = decode_client_audio(frame)
    assert pcm.obj is frame  # a view into the received frame, not a copy
    assert np.array_equal(np.frombuffer(pcm, dtype="<i2"), samples)

    buffer = bytearray(frame)
    view = decode_client_audio(buffer)
    buffer[1] ^= 0xFF
    assert view[0] == buffer[1]

    out = np.linspace(-30000, 30000, OUT_FRAME_SAMPLES).astype(np.int16)
    assert np.array_equal(np.frombuffer(decode_server(encode_server_audio(out)), "<i2"), out)
    # A 2-D int16 buffer of the right size is flattened by the decoder's cast, not refused.
    assert decode_client_audio(memoryview(np.frombuffer(frame, np.uint8).reshape(1, -1))) == frame[1:]


@pytest.mark.parametrize(
    ("encode", "pcm"),
    [
        (encode_server_audio, bytes(959)),
        (encode_server_audio, bytes(961)),
        (encode_server_audio, np.zeros(OUT_FRAME_SAMPLES, np.float32)[:240]),  # 960 bytes, not int16
        (encode_server_audio, np.zeros(OUT_FRAME_SAMPLES, ">i2")),  # big-endian
        (encode_client_audio, bytes(IN_FRAME_BYTES + 2)),
        (encode_client_audio, np.zeros(IN_FRAME_SAMPLES // 2, np.int32)),
    ],
)
def test_audio_encoders_refuse_wrong_size_or_sample_format(encode: Callable[[Any], bytes], pcm: Any) -> None:
    with pytest.raises(ValueError):
        encode(pcm)


@given(server_messages)
def test_server_control_round_trip(msg: Any) -> None:
    text = encode_server_control(msg)
    assert isinstance(text, str)
    assert json.loads(text)["type"] == msg.__struct_config__.tag
    assert decode_server(text) == msg
    assert decode_server_control(text.encode()) == msg


@given(client_messages)
def test_client_control_round_trip(msg: Any) -> None:
    text = encode_client_control(msg)
    assert decode_client(text) == msg
    assert decode_client_control(text.encode()) == msg
    assert decode_client_control(bytearray(text.encode())) == msg


def test_session_start_helper_fills_in_the_fixed_formats() -> None:
    msg = protocol.session_start("s-1", model="kyutai/moshiko", demo_weights=False, max_sessions=4)
    wire = json.loads(encode_server_control(msg))
    assert wire["protocol_version"] == protocol.PROTOCOL_VERSION
    assert wire["input"] == {
        "encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1, "frame_ms": 20, "frame_bytes": 640,
        "prefix": 1,
    }  # fmt: skip
    assert wire["output"]["sample_rate"] == 24000
    assert wire["output"]["frame_bytes"] == 960
    assert wire["output"]["prefix"] == 2
    assert decode_server(json.dumps(wire)) == msg


def test_defaults_fill_optional_fields() -> None:
    assert decode_client('{"type":"session_end"}') == ClientSessionEnd(reason="client_request")
    assert decode_server('{"type":"session_end","reason":"error"}') == SessionEnd("error", 0, 0)
    assert decode_server('{"type":"error","code":"capacity","msg":"full"}') == Error(
        ErrorCode.CAPACITY, "full", fatal=False
    )
    latency = decode_server(
        '{"type":"latency","ms":5,"breakdown":{},"p99_ms":9,"dropped_frames":0,"window_s":1}'
    )
    assert latency.breakdown == LatencyBreakdown(0.0, 0.0, 0.0, 0.0)


def test_unknown_extra_fields_are_ignored() -> None:
    assert decode_client('{"type":"ping","id":7,"t_ms":1.5,"new_field":[1,{"a":2}]}') == Ping(7, 1.5)


def test_encoders_refuse_messages_of_the_other_direction() -> None:
    with pytest.raises(TypeError):
        encode_server_control(ClientSessionEnd())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_client_control(SessionEnd(reason="x"))  # type: ignore[arg-type]


@pytest.mark.parametrize("code", list(ErrorCode))
def test_protocol_error_becomes_an_error_message_and_pickles(code: ErrorCode) -> None:
    exc = ProtocolError(code, f"something about {code.value}")
    assert str(exc) == f"{code.value}: something about {code.value}"
    msg = exc.to_message(fatal=code is ErrorCode.SHUTDOWN)
    assert decode_server(encode_server_control(msg)) == Error(code, exc.msg, fatal=code is ErrorCode.SHUTDOWN)
    again = pickle.loads(pickle.dumps(exc))
    assert (type(again), again.code, again.msg) == (ProtocolError, code, exc.msg)


# --- one targeted case per error code -----------------------------------------------------------

GOOD_CLIENT_AUDIO = b"\x01" + bytes(IN_FRAME_BYTES)
DEEP_ARRAY = "[" * 2000 + "]" * 2000
PING = '{"type":"ping","id":1,"t_ms":0'  # an unfinished ping object, completed per case
E = ErrorCode
TARGETED: list[tuple[str, Decoder, Any, ErrorCode]] = [
    ("empty binary", decode_client, b"", E.EMPTY_FRAME),
    ("empty text", decode_client, "", E.EMPTY_FRAME),
    ("empty text bytes", decode_client_control, b"", E.EMPTY_FRAME),
    ("server prefix from client", decode_client, b"\x02" + bytes(IN_FRAME_BYTES), E.BAD_HEADER),
    ("client prefix from server", decode_server, b"\x01" + bytes(OUT_FRAME_BYTES), E.BAD_HEADER),
    ("text where audio expected", decode_client_audio, PING + "}", E.BAD_HEADER),
    ("short audio", decode_client, b"\x01" + bytes(IN_FRAME_BYTES - 1), E.BAD_LENGTH),
    ("long audio", decode_client, GOOD_CLIENT_AUDIO + b"\x00", E.BAD_LENGTH),
    ("prefix only", decode_client, b"\x01", E.BAD_LENGTH),
    ("server-size audio from client", decode_client, b"\x01" + bytes(OUT_FRAME_BYTES), E.BAD_LENGTH),
    ("oversize str", decode_client, " " * (MAX_TEXT_BYTES + 1), E.OVERSIZE),
    ("oversize bytes", decode_client_control, b" " * (MAX_TEXT_BYTES + 1), E.OVERSIZE),
    # 2000 characters but 6000 bytes of UTF-8: the limit is on bytes.
    ("oversize multibyte str", decode_client, "ఆ" * 2000, E.OVERSIZE),
    ("invalid utf-8 in a string", decode_client_control, PING.encode() + b',"x":"\xff"}', E.BAD_UTF8),
    ("invalid utf-8 outside strings", decode_client_control, b"\xc3\x28", E.BAD_UTF8),
    ("lone surrogate", decode_client, PING + ',"x":"\ud800"}', E.BAD_UTF8),
    ("lone surrogate in a long str", decode_client, '{"x":"\ud800' + " " * 2000 + '"}', E.BAD_UTF8),
    ("malformed json", decode_client, '{"type":"ping",', E.BAD_JSON),
    ("trailing garbage", decode_client, PING + "} x", E.BAD_JSON),
    ("not an object", decode_client, '["ping", 1, 0]', E.BAD_JSON),
    ("bare number", decode_server, "42", E.BAD_JSON),
    ("deeply nested", decode_client, DEEP_ARRAY, E.BAD_JSON),
    ("deeply nested field", decode_client, PING + ',"x":' + DEEP_ARRAY + "}", E.BAD_JSON),
    ("number beyond float range", decode_client, '{"type":"ping","id":1,"t_ms":1e999}', E.BAD_JSON),
    ("unknown type", decode_client, '{"type":"dance"}', E.UNKNOWN_TYPE),
    (
        "server-only type from client",
        decode_client,
        '{"type":"transcript","text":"x","t_ms":0}',
        E.UNKNOWN_TYPE,
    ),
    ("type missing", decode_client, '{"id":1,"t_ms":0}', E.BAD_FIELD),
    ("type not a string", decode_client, '{"type":1}', E.BAD_FIELD),
    ("field missing", decode_client, '{"type":"ping","t_ms":0}', E.BAD_FIELD),
    ("field mistyped", decode_client, '{"type":"pong","id":"1","t_ms":0}', E.BAD_FIELD),
    ("negative id", decode_client, '{"type":"ping","id":-1,"t_ms":0}', E.BAD_FIELD),
    ("id beyond JS-safe", decode_client, '{"type":"ping","id":9007199254740992,"t_ms":0}', E.BAD_FIELD),
    ("null float (NaN sent)", decode_server, '{"type":"vad","event":"start","t_ms":null}', E.BAD_FIELD),
    ("bad vad event", decode_server, '{"type":"vad","event":"maybe","t_ms":0}', E.BAD_FIELD),
    ("unknown error code", decode_server, '{"type":"error","code":"oops","msg":""}', E.BAD_FIELD),
]


@pytest.mark.parametrize(
    ("decode", "data", "code"), [case[1:] for case in TARGETED], ids=[c[0] for c in TARGETED]
)
def test_targeted_error_code(decode: Decoder, data: Any, code: ErrorCode) -> None:
    assert _code_of(decode, data) is code


def test_every_decoder_error_code_has_a_targeted_case() -> None:
    session_level = {E.CAPACITY, E.RATE_LIMITED, E.INTERNAL, E.SHUTDOWN, E.BAD_REQUEST, E.IDLE_TIMEOUT,
                     E.TIME_LIMIT, E.RESUME_FAILED}
    session_level.add(E.BAD_AUDIO)  # raised by the Opus decoder (procs/network/codec.py; tests/test_opus.py)
    assert {case[3] for case in TARGETED} == set(ErrorCode) - session_level


# --- check order --------------------------------------------------------------------------------


def test_binary_checks_run_empty_then_header_then_length() -> None:
    assert _code_of(decode_client, b"") is ErrorCode.EMPTY_FRAME
    assert _code_of(decode_client, b"\x7f") is ErrorCode.BAD_HEADER  # wrong header and wrong length
    assert _code_of(decode_client, b"\x7f" + bytes(IN_FRAME_BYTES)) is ErrorCode.BAD_HEADER


def test_text_checks_run_size_then_utf8_then_json_then_type_then_fields() -> None:
    oversize_and_not_utf8 = b"\xff" * (MAX_TEXT_BYTES + 1)
    assert _code_of(decode_client_control, oversize_and_not_utf8) is ErrorCode.OVERSIZE
    assert _code_of(decode_client_control, b"{\xff") is ErrorCode.BAD_UTF8  # not UTF-8 and not JSON
    assert _code_of(decode_client, '{"type":"dance",') is ErrorCode.BAD_JSON  # unknown type, malformed
    assert _code_of(decode_client, '{"type":"dance","id":"x"}') is ErrorCode.UNKNOWN_TYPE  # and a bad field
    assert _code_of(decode_client, '{"type":"ping","id":"x"}') is ErrorCode.BAD_FIELD


def test_largest_allowed_text_frame_is_accepted() -> None:
    prefix = '{"type":"session_end","reason":"'
    reason = "x" * (MAX_TEXT_BYTES - len(prefix) - 2)
    text = prefix + reason + '"}'
    assert len(text.encode()) == MAX_TEXT_BYTES
    assert decode_client(text) == ClientSessionEnd(reason=reason)
    assert _code_of(decode_client, prefix + reason + 'x"}') is ErrorCode.OVERSIZE


# --- fuzzing: nothing but ProtocolError ever escapes a decoder -----------------------------------


@settings(deadline=None)
@given(st.binary(max_size=IN_FRAME_BYTES + 400))
def test_arbitrary_bytes_only_raise_protocol_error(data: bytes) -> None:
    for decode in ALL_DECODERS:
        _decodes_or_refuses(decode, data)


@settings(deadline=None)
@given(
    st.sampled_from([b"\x01", b"\x02"]), st.binary(min_size=IN_FRAME_BYTES - 2, max_size=OUT_FRAME_BYTES + 2)
)
def test_arbitrary_audio_sized_frames_decode_exactly_when_the_size_is_right(
    prefix: bytes, pcm: bytes
) -> None:
    frame = prefix + pcm
    for decode, expected_prefix, size in (
        (decode_client, b"\x01", IN_FRAME_BYTES),
        (decode_server, b"\x02", OUT_FRAME_BYTES),
    ):
        result = _decodes_or_refuses(decode, frame)
        if prefix == expected_prefix and len(pcm) == size:
            assert result == pcm
        else:
            assert isinstance(result, ProtocolError)
            assert result.code is (
                ErrorCode.BAD_HEADER if prefix != expected_prefix else ErrorCode.BAD_LENGTH
            )


@settings(deadline=None)
@given(st.text(max_size=300) | st.text(max_size=MAX_TEXT_BYTES + 10, alphabet=st.characters(codec="utf-8")))
def test_arbitrary_text_only_raises_protocol_error(text: str) -> None:
    for decode in TEXT_DECODERS:
        _decodes_or_refuses(decode, text)
        _decodes_or_refuses(decode_client_control, text.encode("utf-8", "surrogatepass"))


@settings(deadline=None, max_examples=300)
@given(json_objects)
def test_arbitrary_json_objects_decode_to_valid_messages_or_raise_protocol_error(obj: dict[str, Any]) -> None:
    text = json.dumps(obj)  # may contain NaN/Infinity, which is not JSON: must be bad_json then
    for decode, encode in ((decode_client, encode_client_control), (decode_server, encode_server_control)):
        result = _decodes_or_refuses(decode, text)
        if isinstance(result, ProtocolError):
            if "type" in obj and isinstance(obj["type"], str) and result.code is ErrorCode.UNKNOWN_TYPE:
                tags = CLIENT_CONTROL_TAGS if decode is decode_client else SERVER_CONTROL_TAGS
                assert obj["type"] not in tags
        else:
            assert result.__struct_config__.tag == obj["type"]
            assert decode(encode(result)) == result
