"""Messages between our processes: msgpack round trips, tags, and refusal of garbage."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import EndReason, ErrorCode, Ping, ProtocolError
from protocol.internal import (
    InferenceReady,
    InternalMessage,
    ModelText,
    NetworkHello,
    NetworkReady,
    SessionClose,
    SessionDetached,
    SessionOpen,
    SlotError,
    StepStats,
    VadReady,
    VoiceActivity,
    WorkerDown,
    decode_internal,
    encode_internal,
)

ALL_TYPES = (
    SessionOpen,
    SessionClose,
    SessionDetached,
    VoiceActivity,
    ModelText,
    SlotError,
    InferenceReady,
    VadReady,
    NetworkReady,
    StepStats,
    NetworkHello,
    WorkerDown,
)

slots = st.integers(min_value=0, max_value=1023)
gens = st.integers(min_value=0, max_value=2**32 - 1)
session_ids = st.text(max_size=40)
# msgpack carries floats as IEEE doubles, so even NaN and infinities survive (compared via repr below).
floats = st.floats()
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)

internal_messages = st.one_of(
    st.builds(SessionOpen, slot=slots, gen=gens, session_id=session_ids),
    st.builds(SessionClose, slot=slots, gen=gens, reason=st.sampled_from(EndReason)),
    st.builds(VoiceActivity, slot=slots, gen=gens, event=st.sampled_from(["start", "end"]), t_ms=floats),
    st.builds(ModelText, slot=slots, gen=gens, text=st.text(), t_ms=floats),
    st.builds(SlotError, slot=slots, gen=gens, code=st.sampled_from(ErrorCode), msg=st.text()),
    st.builds(
        InferenceReady,
        model=st.text(max_size=20),
        demo_weights=st.booleans(),
        max_sessions=st.integers(0, 256),
        device=st.text(max_size=10),
    ),
    st.builds(VadReady, model=st.text(max_size=20)),
    st.builds(NetworkHello),
    st.builds(SessionDetached, slot=st.integers(0, 255), gen=st.integers(0, 2**31)),
    st.builds(WorkerDown, worker=st.sampled_from(["inference-0", "vad"]), why=st.text(max_size=20)),
    st.builds(NetworkReady, host=st.text(max_size=9), port=st.integers(0, 65535), model=st.text(max_size=9)),
    st.builds(StepStats, step_s=floats, batch=st.integers(0, 64), wait_s=st.lists(floats, max_size=64)),
)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def test_tags_are_snake_case_class_names() -> None:
    for cls in ALL_TYPES:
        assert cls.__struct_config__.tag == _snake_case(cls.__name__)
    assert set(ALL_TYPES) == set(InternalMessage.__args__)


@given(internal_messages)
def test_round_trip(msg: Any) -> None:
    data = encode_internal(msg)
    assert isinstance(data, bytes)
    decoded = decode_internal(data)
    assert type(decoded) is type(msg)
    assert repr(decoded) == repr(msg)  # repr, so NaN fields compare equal
    assert repr(decode_internal(memoryview(data))) == repr(msg)


def test_encoding_is_compact_and_tagged() -> None:
    data = encode_internal(SessionOpen(slot=3, gen=7, session_id="abc"))
    assert msgspec.msgpack.decode(data) == ["session_open", 3, 7, "abc"]
    assert len(data) < 24


def test_codes_and_reasons_are_checked_on_decode() -> None:
    """Typed fields refuse what is not one of their values, even from our own processes."""
    bad_code = msgspec.msgpack.encode(["slot_error", 1, 2, "no_such_code", "x"])
    bad_reason = msgspec.msgpack.encode(["session_close", 1, 2, "bored"])
    for data in (bad_code, bad_reason):
        with pytest.raises(ProtocolError):
            decode_internal(data)
    assert decode_internal(msgspec.msgpack.encode(["slot_error", 1, 2, "capacity", "x"])).code is (
        ErrorCode.CAPACITY
    )


def test_encode_refuses_non_internal_messages() -> None:
    with pytest.raises(TypeError):
        encode_internal(Ping(id=1, t_ms=0.0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        msgspec.msgpack.encode(["no_such_message", 1]),
        msgspec.msgpack.encode(["session_open", "not a slot", "abc", 1]),
        msgspec.msgpack.encode(["session_open", 1, "abc"]),  # field missing
        msgspec.msgpack.encode(["voice_activity", 1, 2, "maybe", 0.0]),
        msgspec.msgpack.encode({"type": "vad_ready", "model": "silero"}),  # a map, not an array
        b"\xdd\xff\xff\xff\xff",  # array header claiming 4 billion items, then nothing
        b"\x91" * 5000 + b"\xc0",  # nested far too deep
    ],
)
def test_garbage_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_internal(data)
    assert caught.value.code is ErrorCode.INTERNAL


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    try:
        msg = decode_internal(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.INTERNAL
    else:
        assert isinstance(msg, ALL_TYPES)


@settings(deadline=None)
@given(internal_messages, st.data())
def test_corrupted_messages_decode_or_raise_protocol_error(msg: Any, data: st.DataObject) -> None:
    encoded = bytearray(encode_internal(msg))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    try:
        decoded = decode_internal(bytes(encoded[:cut]))
    except ProtocolError as exc:
        assert exc.code is ErrorCode.INTERNAL
    else:
        assert isinstance(decoded, ALL_TYPES)
