"""The session's rules, driven directly: no socket, no ring, no event loop (procs/network/session.py)."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import CloseCode

from procs.config import ServerConfig
from procs.frames import ModelFrame
from procs.network.quality import QualityReport
from procs.network.session import (
    CLOSE_CODES,
    RESUMABLE_ENDINGS,
    ClientAudio,
    Close,
    ModelAudio,
    Phase,
    PublishAudio,
    Release,
    Session,
    SessionRules,
)
from procs.network.slots import SessionSlots, capacity_refusal
from procs.network.wires import decode_ws
from protocol import (
    IN_FRAME_BYTES,
    OUT_FRAME_BYTES,
    ClientSessionEnd,
    Draining,
    EndReason,
    Error,
    ErrorCode,
    Latency,
    Ping,
    Pong,
    ProtocolError,
    SessionEnd,
    SessionStart,
    Transcript,
    Vad,
    decode_client,
    decode_server,
    encode_client_audio,
    encode_client_control,
    session_start,
)

MS = 1_000_000
AUDIO = encode_client_audio(bytes(IN_FRAME_BYTES))


def rules_with(**limits: float | None) -> SessionRules:
    """The rules of a server with ServerConfig's defaults, `limits` changed."""
    return dataclasses.replace(SessionRules.of(ServerConfig()), **limits)


def receive(session: Session, message: str | bytes, now_ns: int) -> list[object]:
    """A `/ws` client's message, decoded at the edge as the server does (procs/network/wires.py)."""
    return session.receive(decode_ws(message), now_ns)


def new_session(gen: int = 1, rules: SessionRules | None = None) -> Session:
    return Session(session_start("s1", model="m", demo_weights=True, max_sessions=4), slot=2, gen=gen,
                   now=0.0, rules=rules)


def model_frame(gen: int = 1, block_pos: int = 0, t_in_ns: int = 0, dropped: int = 0, fill: int = 0,
                realigned: int = 0) -> ModelFrame:
    return ModelFrame(seq=0, t_in_ns=t_in_ns, gen=gen, block_pos=block_pos, queue_us=1000, step_us=2000,
                      resample_us=100, dropped=dropped, realigned=realigned,
                      pcm=bytes([fill]) * OUT_FRAME_BYTES)


def drain(session: Session, now_ns: int = 0) -> list[object]:
    """Everything the session has for its client now, as typed values (control messages, ModelAudio,
    Close); quality reports, which go to the server's metrics and never to a client, left out."""
    out: list[object] = []
    while (item := session.next_outgoing(now_ns)) is not None:
        if not isinstance(item, QualityReport):
            out.append(item)
    return out


def opened() -> Session:
    session = new_session()
    assert isinstance(drain(session)[0], SessionStart)
    return session


# ---- opening, audio, ping ----------------------------------------------------------------------------------


def test_session_start_is_the_first_message() -> None:
    session = new_session()
    out = drain(session)
    assert len(out) == 1 and isinstance(out[0], SessionStart)
    assert out[0].session_id == "s1" and out[0].demo_weights and out[0].max_sessions == 4


def test_client_audio_is_published_in_order_with_its_arrival_time() -> None:
    session = opened()
    first = receive(session, encode_client_audio(bytes(range(256)) * 2 + bytes(128)), 5 * MS)
    second = receive(session, AUDIO, 25 * MS)
    assert [type(a) for a in first + second] == [PublishAudio, PublishAudio]
    assert (first[0].seq, first[0].t_ns, second[0].seq, second[0].t_ns) == (0, 5 * MS, 1, 25 * MS)
    assert bytes(first[0].pcm)[:3] == b"\x00\x01\x02" and len(first[0].pcm) == IN_FRAME_BYTES
    assert session.counters.frames_in == 2
    assert drain(session) == []  # audio in is not answered by itself


def test_ping_is_answered_with_its_id_and_time_and_pong_with_nothing() -> None:
    session = opened()
    assert receive(session, encode_client_control(Ping(id=7, t_ms=12.5)), 0) == []
    assert drain(session) == [Pong(id=7, t_ms=12.5)]
    assert receive(session, encode_client_control(Pong(id=1, t_ms=0.0)), 0) == []
    assert drain(session) == []


# ---- malformed input ---------------------------------------------------------------------------------------


def test_malformed_input_gets_an_error_and_the_session_goes_on() -> None:
    session = opened()
    assert receive(session, b"\x07" + bytes(640), 0) == []
    assert receive(session, "not json", 0) == []
    errors = drain(session)
    assert [e.code for e in errors] == [ErrorCode.BAD_HEADER, ErrorCode.BAD_JSON]
    assert not any(e.fatal for e in errors)
    assert session.phase is Phase.OPEN and session.counters.malformed == 2
    assert isinstance(receive(session, AUDIO, 0)[0], PublishAudio)


def test_at_most_ten_errors_a_second_are_sent() -> None:
    session = opened()
    for i in range(30):
        receive(session, b"", i * MS)  # 30 within 30 ms
    assert len(drain(session)) == 10
    receive(session, b"", 1_100 * MS)  # a second later the budget is back
    assert len(drain(session)) == 1
    assert session.counters.malformed == 31


def test_fifty_malformed_messages_within_ten_seconds_close_with_1008_once() -> None:
    session = opened()
    actions = []
    for i in range(49):
        actions += receive(session, b"", i * 100 * MS)  # one every 100 ms: 4.9 s
    assert actions == [] and session.phase is Phase.OPEN
    actions = receive(session, b"", 4_950 * MS)
    assert actions == [Release(EndReason.PROTOCOL_ERROR)]
    out = drain(session)
    fatal = [m for m in out if isinstance(m, Error) and m.fatal]
    assert len(fatal) == 1 and fatal[0].code == ErrorCode.EMPTY_FRAME
    assert out[-1] == Close(1008, "too many malformed messages")
    assert sum(isinstance(m, Close) for m in out) == 1
    assert receive(session, b"", 5_000 * MS) == [] and drain(session) == []  # over: nothing more


def test_malformed_messages_older_than_the_window_are_forgiven() -> None:
    session = opened()
    for i in range(49):
        receive(session, b"", i * MS)
    for i in range(49):
        receive(session, b"", 10_100 * MS + i * MS)  # the first 49 are more than 10 s old
    assert session.phase is Phase.OPEN


# ---- ending ------------------------------------------------------------------------------------------------


def test_the_client_asks_to_end() -> None:
    session = opened()
    receive(session, AUDIO, 0)
    actions = receive(session, encode_client_control(ClientSessionEnd()), 0)
    assert actions == [Release(EndReason.CLIENT_REQUEST)]
    out = drain(session)
    assert out[0] == SessionEnd(reason="client_request", frames_in=1, frames_out=0)
    assert out[-1] == Close(1000, "session ended")
    assert session.phase is Phase.CLOSING
    assert session.connection_closed(EndReason.CLIENT_CLOSED, 0.0) == []  # the release was given already
    assert session.phase is Phase.CLOSED


def test_a_client_that_goes_away_releases_the_slot_and_is_sent_nothing() -> None:
    session = new_session()  # session_start still queued: never sent
    assert session.connection_closed(EndReason.CLIENT_CLOSED, 0.0) == [Release(EndReason.CLIENT_CLOSED)]
    assert session.phase is Phase.CLOSED and session.close is None
    assert not session.wants_to_send() and drain(session) == []
    assert session.connection_closed(EndReason.CLIENT_CLOSED, 0.0) == []
    assert session.shutdown() == [] and receive(session, AUDIO, 0) == []


def test_shutdown_says_goodbye_with_1001() -> None:
    session = opened()
    assert session.shutdown() == [Release(EndReason.SERVER_SHUTDOWN)]
    out = drain(session)
    assert out == [SessionEnd(reason="server_shutdown", frames_in=0, frames_out=0),
                   Close(1001, "server shutting down")]
    assert session.shutdown() == []


def test_queued_messages_go_out_then_session_end_with_exact_counts_then_the_close() -> None:
    session = opened()
    receive(session, AUDIO, 0)
    session.model_audio(model_frame(fill=1))
    session.voice_activity("end", 10.0)
    session.shutdown()
    out = drain(session)
    assert [type(m) for m in out] == [Vad, ModelAudio, SessionEnd, Close]
    assert out[2] == SessionEnd(reason="server_shutdown", frames_in=1, frames_out=1)


def test_capacity_error_from_inference_ends_the_session_with_1013_and_others_do_not() -> None:
    session = opened()
    assert session.slot_error(ErrorCode.INTERNAL, "hiccup") == []
    assert drain(session) == [Error(code=ErrorCode.INTERNAL, msg="hiccup", fatal=False)]
    assert session.slot_error(ErrorCode.CAPACITY, "GPU full") == [Release(EndReason.CAPACITY)]
    assert drain(session) == [Error(code=ErrorCode.CAPACITY, msg="GPU full", fatal=True),
                              Close(1013, "Server at capacity")]


def test_capacity_refusal_is_a_fatal_error_a_page_can_show() -> None:
    assert decode_server(capacity_refusal()) == Error(code=ErrorCode.CAPACITY, msg="Server at capacity",
                                                      fatal=True)


# ---- model output ------------------------------------------------------------------------------------------


def test_model_audio_goes_out_after_control_with_its_latency() -> None:
    session = opened()
    session.model_audio(model_frame(block_pos=0, t_in_ns=100 * MS, fill=9))
    session.model_audio(model_frame(block_pos=1, t_in_ns=100 * MS))
    session.voice_activity("start", 40.0)
    session.model_text(" నమస్తే", 80.0)
    out = drain(session, now_ns=103 * MS)
    assert out[:2] == [Vad(event="start", t_ms=40.0), Transcript(text=" నమస్తే", t_ms=80.0)]
    first, second = out[2:]
    assert first.pcm == bytes([9]) * OUT_FRAME_BYTES  # PCM: each wire encodes it at its edge
    assert first.latency_s == pytest.approx(0.003) and second.latency_s is None
    assert session.counters.frames_out == 2


def test_a_previous_sessions_model_audio_is_ignored() -> None:
    session = new_session(gen=3)
    drain(session)
    session.model_audio(model_frame(gen=2))
    assert drain(session) == [] and session.counters.frames_out == 0


def test_model_audio_beyond_the_bound_drops_the_oldest_and_counts_it() -> None:
    session = opened()
    rules = session.rules
    for i in range(rules.max_queued_audio_frames + 5):
        session.model_audio(model_frame(fill=i))
    out = drain(session)
    assert len(out) == rules.max_queued_audio_frames
    assert out[0].pcm[0] == 5  # frames 0-4 went first
    assert session.counters.output_dropped == 5


def test_input_drops_and_realignments_reported_by_inference_reach_the_latency_report() -> None:
    session = opened()
    session.model_audio(model_frame(t_in_ns=0, dropped=4, realigned=2))
    drain(session, now_ns=2 * MS)
    session.tick(1.0)
    (report,) = drain(session)
    assert isinstance(report, Latency) and report.dropped_frames == 4 and report.realigned_frames == 2
    assert (session.counters.input_dropped, session.counters.input_realigned) == (4, 2)
    assert report.ms == pytest.approx(2.0) and report.breakdown.step_ms == pytest.approx(2.0)


def test_latency_reports_keep_their_period_under_a_coarse_tick() -> None:
    session = opened()
    session.model_audio(model_frame(t_in_ns=0))
    drain(session, now_ns=MS)
    reports = 0
    for tick in range(1, 101):  # 10 s of 0.1 s ticks, each a little late
        session.tick(tick * 0.1 + 0.003)
        reports += sum(isinstance(m, Latency) for m in drain(session))
    assert reports == 10


def test_latency_is_reported_once_a_period_after_the_first_audio_and_repeats_when_idle() -> None:
    session = opened()
    session.tick(1.5)
    assert drain(session) == []  # nothing answered yet: nothing to report
    session.model_audio(model_frame(t_in_ns=0))
    drain(session, now_ns=MS)
    session.tick(1.6)  # reports are due on the period's grid: 1 s, 2 s, 3 s... after the start
    assert drain(session) == []
    session.tick(2.5)
    (first,) = drain(session)
    session.tick(3.5)
    assert drain(session) == [first]  # no new block answered: the last figures again


def test_the_quality_report_leaves_through_the_outbox_first_and_only_the_newest() -> None:
    session = opened()
    receive(session, AUDIO, 0)
    session.model_audio(model_frame(t_in_ns=0))
    session.tick(1.0)
    session.tick(2.0)  # the sender fell behind: the first report is replaced, not queued
    out = []
    while (item := session.next_outgoing(0)) is not None:
        out.append(item)
    assert isinstance(out[0], QualityReport)  # for the server's metrics, before anything for the client
    assert not any(isinstance(item, QualityReport) for item in out[1:])
    assert [type(item) for item in out[1:]] == [ModelAudio]  # nothing answered before the tick: no latency
    session.tick(3.0)
    session.connection_closed(EndReason.CLIENT_CLOSED, 0.0)
    assert session.next_outgoing(0) is None  # a closed session reports nothing more


def test_the_session_takes_pcm_as_its_edge_decoded_it() -> None:
    session = opened()
    pcm = memoryview(bytes(range(256)) * 2 + bytes(128))
    (action,) = session.receive(ClientAudio(pcm), 0)
    assert isinstance(action, PublishAudio) and action.pcm is pcm  # not copied, not re-decoded
    error = ProtocolError(ErrorCode.BAD_LENGTH, "short")
    assert session.receive(error, MS) == [] and session.counters.malformed == 1
    assert drain(session) == [Error(code=ErrorCode.BAD_LENGTH, msg="short", fatal=False)]


def test_every_close_code_is_a_websockets_close_code_from_one_map() -> None:
    assert all(isinstance(code, CloseCode) for code in CLOSE_CODES.values())
    # Every ending but the client's own has a code of ours.
    assert set(EndReason) - set(CLOSE_CODES) == {EndReason.CLIENT_CLOSED, EndReason.CONNECTION_LOST,
                                                 EndReason.RECONNECTING}
    assert CLOSE_CODES[EndReason.CAPACITY] is CloseCode.TRY_AGAIN_LATER
    assert CLOSE_CODES[EndReason.SERVER_SHUTDOWN] is CloseCode.GOING_AWAY
    ended = {EndReason.CLIENT_REQUEST: lambda s: receive(s, encode_client_control(ClientSessionEnd()), 0),
             EndReason.SERVER_SHUTDOWN: lambda s: s.shutdown(),
             EndReason.CAPACITY: lambda s: s.slot_error(ErrorCode.CAPACITY, "full"),
             EndReason.INTERNAL: lambda s: s.internal_failure("gone"),
             EndReason.IDLE_TIMEOUT: lambda s: s.tick(60.0)}
    for reason, end in ended.items():
        session = opened()
        end(session)
        assert session.end_reason is reason
        assert drain(session)[-1].code is CLOSE_CODES[reason]


# ---- admission ---------------------------------------------------------------------------------------------


def test_slots_admit_up_to_capacity_and_count_generations() -> None:
    slots: SessionSlots[str] = SessionSlots(3)
    a = slots.admit(2, lambda slot, gen: f"{slot}/{gen}")
    b = slots.admit(2, lambda slot, gen: f"{slot}/{gen}")
    assert (a, b) == ("0/1", "1/1")
    assert slots.admit(2, lambda slot, gen: "x") is None  # capacity 2 of 3 rings
    assert not slots.release(0, 2)  # not the session that holds slot 0
    assert slots.release(0, 1) and not slots.release(0, 1)
    assert slots.get(0, 1) is None and slots.get(1, 1) == "1/1"
    assert slots.admit(2, lambda slot, gen: f"{slot}/{gen}") == "0/2"
    assert len(slots) == 2


def test_a_failed_admission_keeps_the_slot_free() -> None:
    slots: SessionSlots[str] = SessionSlots(1)

    def broken(slot: int, gen: int) -> str:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        slots.admit(1, broken)
    assert slots.admit(1, lambda slot, gen: "ok") == "ok"


# ---- invariants over arbitrary event sequences -------------------------------------------------------------

client_messages = st.one_of(
    st.just(AUDIO),
    st.just(encode_client_control(Ping(id=1, t_ms=0.0))),
    st.just(encode_client_control(Pong(id=1, t_ms=0.0))),
    st.just(encode_client_control(ClientSessionEnd())),
    st.binary(max_size=700),
    st.text(max_size=50),
    st.just(msgspec.json.encode({"type": "ping", "id": -1}).decode()),
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("receive"), client_messages),
        st.tuples(st.just("receive_many"), client_messages, st.integers(1, 60)),
        st.tuples(st.just("audio"), st.integers(0, 3), st.integers(0, 3)),
        st.tuples(st.just("vad"), st.sampled_from(["start", "end"])),
        st.tuples(st.just("text"), st.text(max_size=10)),
        st.tuples(st.just("slot_error"), st.sampled_from(ErrorCode)),
        st.tuples(st.just("tick"), st.floats(0, 3)),
        st.tuples(st.just("send"), st.integers(0, 100)),
        st.just(("shutdown",)),
        st.just(("drain",)),
        st.just(("connection_closed",)),
        st.tuples(st.just("connection_lost"), st.sampled_from(sorted(RESUMABLE_ENDINGS))),
        st.just(("attach",)),
        st.just(("connection_replaced",)),
    ),
    max_size=60,
)


@settings(deadline=None, max_examples=300)
@given(events)
def test_any_sequence_of_events_keeps_the_invariants(sequence: list[tuple]) -> None:
    session = new_session(gen=2, rules=rules_with(resume_window_s=1.0))
    now = 0.0
    releases: list[Release] = []
    sent: list[object] = []
    published = 0
    malformed_while_open = 0
    model_frames_taken = 0

    def expect_malformed(message: str | bytes) -> int:
        """An independent oracle: does the protocol's decoder refuse this message?"""
        try:
            decode_client(message)
        except ProtocolError:
            return 1
        return 0

    def take(actions: list) -> None:
        nonlocal published
        for action in actions:
            if isinstance(action, Release):
                releases.append(action)
            else:
                assert isinstance(action, PublishAudio)
                assert session.phase is Phase.OPEN, "published while not open"
                published += 1

    def send(n: int) -> None:
        for _ in range(n):
            item = session.next_outgoing(int(now * 1e9))
            if item is None:
                return
            if isinstance(item, QualityReport):
                continue
            assert not any(isinstance(s, Close) for s in sent), "sent something after the close"
            sent.append(item)

    for event in sequence:
        was_open = session.phase is Phase.OPEN
        was_detached = session.phase is Phase.DETACHED
        kind = event[0]
        now += 0.01
        queued_before = session.queued
        if kind in ("receive", "receive_many"):
            for _ in range(event[2] if kind == "receive_many" else 1):
                if session.phase is Phase.OPEN:
                    malformed_while_open += expect_malformed(event[1])
                take(receive(session, event[1], int(now * 1e9)))
                now += 0.001
        elif kind == "audio":
            gen, pos = event[1], event[2]
            session.model_audio(model_frame(gen=gen, block_pos=pos, t_in_ns=int(now * 1e9)))
            if (was_open or was_detached) and gen == 2:  # queued, or (detached) dropped and counted
                model_frames_taken += 1
        elif kind == "vad":
            take(session.voice_activity(event[1], 0.0))
        elif kind == "text":
            take(session.model_text(event[1], 0.0))
        elif kind == "slot_error":
            take(session.slot_error(event[1], "x"))
        elif kind == "tick":
            now += event[1]
            take(session.tick(now))
        elif kind == "send":
            send(event[1])
        elif kind == "shutdown":
            take(session.shutdown())
        elif kind == "drain":
            take(session.drain(5.0))
        elif kind == "connection_lost":
            take(session.connection_closed(event[1], now))
        elif kind == "connection_replaced":
            take(session.connection_replaced(now))
        elif kind == "attach":
            if session.phase is Phase.DETACHED:
                take(session.attach(session_start("s1", model="m", demo_weights=True, max_sessions=4,
                                                  resume_gap_s=0.0), now))
            else:
                with pytest.raises(ValueError):
                    session.attach(session_start("s1", model="m", demo_weights=True, max_sessions=4), now)
        else:
            take(session.connection_closed(EndReason.CLIENT_CLOSED, now))
        if not was_open and kind not in ("send", "attach"):
            assert session.queued <= queued_before, f"{kind} queued something after the end"
        # Every way out of OPEN and DETACHED released the slot exactly once; nothing else did.
        kept = session.phase in (Phase.OPEN, Phase.DETACHED)
        assert len(releases) == (0 if kept else 1), (session.phase, releases)
        if session.phase in (Phase.CLOSED, Phase.DETACHED):
            assert session.next_outgoing(0) is None and not session.wants_to_send()

    send(10_000)
    closes = [s for s in sent if isinstance(s, Close)]
    assert len(closes) <= 1
    if session.close is not None:
        assert session.end_reason is not None and session.close.code is CLOSE_CODES[session.end_reason]
    if session.close is not None and session.phase is Phase.CLOSING:
        assert closes == [session.close] and sent[-1] == session.close  # exactly one close, last
    fatal = [s for s in sent if isinstance(s, Error) and s.fatal]
    if fatal:
        assert session.close is not None, "a fatal error ends the session with a close"
        if session.phase is Phase.CLOSING:
            assert closes == [session.close]
    # Counters add up.
    c = session.counters
    assert c.frames_in == published
    assert c.malformed == malformed_while_open
    audio_sent = sum(isinstance(s, ModelAudio) for s in sent)
    assert c.frames_out == audio_sent
    if session.phase is not Phase.CLOSED:
        assert c.frames_out + c.output_dropped == model_frames_taken


# ---- hardening: idle, time limit, rate, drain, failures ----------------------------------------------------


def test_a_session_that_sends_no_audio_is_closed_after_the_idle_timeout() -> None:
    session = new_session(rules=rules_with(idle_timeout_s=5.0))
    drain(session)
    receive(session, encode_client_control(Ping(id=1, t_ms=0)), 0)  # control is not audio: still idle
    assert session.tick(4.9) == []
    assert session.tick(5.0) == [Release(EndReason.IDLE_TIMEOUT)]
    out = drain(session)
    assert isinstance(out[-2], Error) and out[-2].code == ErrorCode.IDLE_TIMEOUT and out[-2].fatal
    assert out[-1] == Close(1000, "idle timeout")


def test_audio_keeps_a_session_alive_and_no_timeout_means_never() -> None:
    session = new_session(rules=rules_with(idle_timeout_s=5.0))
    receive(session, AUDIO, 4 * 10**9)
    assert session.tick(8.9) == [] and session.phase is Phase.OPEN
    forever = new_session(rules=rules_with(idle_timeout_s=None))
    assert forever.tick(10_000.0) == [] and forever.phase is Phase.OPEN


def test_a_session_time_limit_ends_it_with_a_goodbye() -> None:
    session = new_session(rules=rules_with(max_session_s=60.0))
    drain(session)
    receive(session, AUDIO, 59 * 10**9)
    assert session.tick(59.9) == []
    assert session.tick(60.0) == [Release(EndReason.TIME_LIMIT)]
    out = drain(session)
    assert isinstance(out[0], Error) and out[0].code == ErrorCode.TIME_LIMIT
    assert out[-2] == SessionEnd(reason="time_limit", frames_in=1, frames_out=0)
    assert out[-1] == Close(1000, "session time limit")


def test_audio_faster_than_twice_real_time_is_refused_then_closed() -> None:
    rules = rules_with(rate_frames_per_s=100.0, rate_burst_frames=50.0, rate_close_after=250)
    session = new_session(rules=rules)
    drain(session)
    published = sum(len(receive(session, AUDIO, i * MS // 10)) for i in range(100))  # 100 frames in 10 ms
    assert published == 50  # the burst (10 ms refill less than a frame)
    errors = [m for m in drain(session) if isinstance(m, Error)]
    assert errors and all(e.code == ErrorCode.RATE_LIMITED and not e.fatal for e in errors)
    assert session.counters.input_rate_limited == 50
    assert session.phase is Phase.OPEN
    actions = []
    for i in range(1000):  # a flood: 1,000 frames a second for a second
        actions += receive(session, AUDIO, 10 * MS + i * MS)
    assert Release(EndReason.RATE_LIMITED) in actions
    assert drain(session)[-1] == Close(1008, "audio faster than real time")


def test_real_time_audio_with_a_catch_up_burst_is_never_refused() -> None:
    """A minute at 50 frames a second, except that a 1 s network stall delivers 50 frames at once."""
    session = new_session()
    for i in range(3000):
        sent = i * 20 * MS
        arrives = 31 * 10**9 if 1500 <= i < 1550 else sent  # frames of 30-31 s all arrive at 31 s
        receive(session, AUDIO, max(arrives, sent))
    assert session.counters.input_rate_limited == 0 and session.counters.frames_in == 3000


def test_a_ping_flood_is_refused_beyond_its_own_budget_and_the_page_pace_never_is() -> None:
    session = opened()
    for i in range(100):  # 100 pings within 100 ms
        receive(session, encode_client_control(Ping(id=i, t_ms=0.0)), i * MS)
    out = drain(session)
    pongs = [m for m in out if isinstance(m, Pong)]
    refused = [m for m in out if isinstance(m, Error)]
    assert 20 <= len(pongs) <= 22  # the burst, and what 100 ms refilled
    assert refused and all(e.code == ErrorCode.RATE_LIMITED for e in refused)
    assert session.counters.input_rate_limited == 0  # that counter is audio's
    paced = opened()
    for i in range(120):  # the page: a ping a second for two minutes
        receive(paced, encode_client_control(Ping(id=i, t_ms=0.0)), i * 1000 * MS)
    assert len([m for m in drain(paced) if isinstance(m, Pong)]) == 120


def test_the_drain_notice_and_an_internal_failure() -> None:
    session = opened()
    assert session.drain(30.0) == []
    assert drain(session) == [Draining(deadline_s=30.0)]
    assert session.internal_failure("the model process failed") == [Release(EndReason.INTERNAL)]
    out = drain(session)
    assert out == [Error(code=ErrorCode.INTERNAL, msg="the model process failed", fatal=True),
                   Close(1011, "internal error")]
    assert session.drain(10.0) == [] and session.internal_failure("again") == []


def test_why_the_connection_went_is_the_release_reason() -> None:
    session = opened()
    assert session.connection_closed(EndReason.MESSAGE_TOO_BIG, 0.0) == [Release(EndReason.MESSAGE_TOO_BIG)]
    assert session.end_reason is EndReason.MESSAGE_TOO_BIG


def test_unsent_model_audio_is_bounded_at_200_ms() -> None:
    session = opened()
    for i in range(60):
        session.model_audio(model_frame(fill=i % 250))
    assert session.queued == 10 and session.counters.output_dropped == 50


# ---- resume: a dropped link detaches the session for its window ------------------------------------------

WINDOW_S = 10.0


def resumable(**limits: float | None) -> Session:
    """An opened session of a server that keeps dropped sessions WINDOW_S for a resume."""
    session = new_session(rules=rules_with(resume_window_s=WINDOW_S, **limits))
    assert isinstance(drain(session)[0], SessionStart)
    return session


def resumed_start(gap_s: float) -> SessionStart:
    return session_start("s1", model="m", demo_weights=True, max_sessions=4, resume_token="t2",
                         resume_window_s=WINDOW_S, resume_gap_s=gap_s)


@pytest.mark.parametrize("reason", [EndReason.CONNECTION_LOST, EndReason.KEEPALIVE_TIMEOUT,
                                    EndReason.RECONNECTING])
def test_a_link_that_dies_without_a_goodbye_detaches_the_session(reason: EndReason) -> None:
    session = resumable()
    receive(session, AUDIO, 10 * MS)
    session.model_audio(model_frame())
    assert session.connection_closed(reason, now=1.0) == []  # no Release: the slot is kept
    assert session.phase is Phase.DETACHED and session.detached_at == 1.0
    assert session.counters.output_dropped == 1  # queued for the dead link, never sent
    # Detached: it sends nothing, publishes nothing, and what the model still says of its audio is dropped.
    assert not session.wants_to_send() and session.next_outgoing(0) is None
    assert receive(session, AUDIO, 2000 * MS) == []
    session.model_audio(model_frame())
    assert session.voice_activity("start", 0.0) == [] and session.model_text("x", 0.0) == []
    assert session.counters.output_dropped == 2 and session.next_outgoing(0) is None
    # The idle timeout (30 s) does not run while detached; its window does.
    assert session.tick(1.0 + WINDOW_S - 0.1) == []
    assert session.tick(1.0 + WINDOW_S) == [Release(EndReason.CONNECTION_LOST)]
    assert session.phase is Phase.CLOSED and session.tick(100.0) == []
    assert session.connection_closed(EndReason.CONNECTION_LOST, now=200.0) == []


def test_a_resumed_session_says_so_first_and_goes_on_where_it_stopped() -> None:
    session = resumable(idle_timeout_s=5.0)
    receive(session, AUDIO, 10 * MS)
    session.connection_closed(EndReason.CONNECTION_LOST, now=1.0)
    assert session.attach(resumed_start(2.5), now=3.5) == []
    assert session.phase is Phase.OPEN and session.resumes == 1
    first = drain(session)[0]
    assert isinstance(first, SessionStart) and first.resumed and first.resume_gap_s == 2.5
    assert first.session_id == session.session_id
    # Its input numbering goes on: the model's clock never saw the gap.
    session.model_audio(model_frame(t_in_ns=3500 * MS))
    assert any(isinstance(m, ModelAudio) for m in drain(session, 3500 * MS))
    # The idle timeout leaves out the detached time (the last audio before the drop was at 0.01 s, so 0.99 s
    # of silence had passed at the drop), without starting over.
    session.tick(3.5)
    assert session.tick(3.5 + 5.0 - 0.99 - 0.01) == []
    assert session.tick(3.5 + 5.0 - 0.99 + 0.01) == [Release(EndReason.IDLE_TIMEOUT)]


def test_only_a_detached_session_can_be_attached() -> None:
    session = resumable()
    with pytest.raises(ValueError, match="not detached"):
        session.attach(resumed_start(0.0), now=1.0)
    receive(session, AUDIO, 10 * MS)
    session.connection_closed(EndReason.CONNECTION_LOST, now=1.0)
    session.tick(1.0 + WINDOW_S)
    with pytest.raises(ValueError, match="not detached"):
        session.attach(resumed_start(0.0), now=20.0)


@pytest.mark.parametrize("reason", [EndReason.CLIENT_CLOSED, EndReason.MESSAGE_TOO_BIG,
                                    EndReason.INVALID_UTF8])
def test_a_goodbye_or_a_refused_message_ends_a_resumable_session_at_once(reason: EndReason) -> None:
    session = resumable()
    assert session.connection_closed(reason, now=1.0) == [Release(reason)]
    assert session.phase is Phase.CLOSED


def test_without_a_window_a_dropped_link_ends_the_session_as_before() -> None:
    session = new_session(rules=rules_with(resume_window_s=0.0))
    lost = EndReason.CONNECTION_LOST
    assert session.connection_closed(lost, now=1.0) == [Release(lost)]


@pytest.mark.parametrize("ending", ["drain", "shutdown", "internal_failure", "capacity", "time_limit"])
def test_a_detached_session_ends_at_once_when_the_server_or_its_limits_end_it(ending: str) -> None:
    session = resumable(max_session_s=60.0)
    receive(session, AUDIO, 10 * MS)
    session.connection_closed(EndReason.CONNECTION_LOST, now=59.0)
    actions = {
        "drain": lambda: session.drain(30.0),
        "shutdown": session.shutdown,
        "internal_failure": lambda: session.internal_failure("gone"),
        "capacity": lambda: session.slot_error(ErrorCode.CAPACITY, "GPU memory"),
        "time_limit": lambda: session.tick(60.0),
    }[ending]()
    assert len(actions) == 1 and isinstance(actions[0], Release)
    assert session.phase is Phase.CLOSED and not session.wants_to_send()


def test_a_draining_session_that_loses_its_link_ends() -> None:
    session = resumable()
    receive(session, AUDIO, 10 * MS)
    session.drain(30.0)
    lost = EndReason.CONNECTION_LOST
    assert session.connection_closed(lost, now=1.0) == [Release(lost)]


def test_a_session_that_never_heard_a_frame_is_not_kept() -> None:
    """A handshake and a reset, before any audio: nothing to resume, and kept it would hold a slot for a
    whole window for the price of one connection."""
    session = resumable()
    lost = EndReason.CONNECTION_LOST
    assert session.connection_closed(lost, now=1.0) == [Release(lost)]


def test_a_resume_takes_a_session_over_from_its_link_even_before_its_first_audio() -> None:
    """The client presents its token: whatever the old link heard, the session is detached to be attached
    to the new one at once (unless the server is draining: then it ends)."""
    session = resumable()
    assert session.connection_replaced(now=2.0) == [] and session.phase is Phase.DETACHED
    session.attach(resumed_start(0.0), now=2.0)
    assert session.phase is Phase.OPEN
    draining = resumable()
    draining.drain(30.0)
    assert draining.connection_replaced(now=2.0) == [Release(EndReason.RECONNECTING)]


def test_dropping_and_resuming_does_not_keep_a_silent_session_alive() -> None:
    session = resumable(idle_timeout_s=5.0)
    receive(session, AUDIO, 0)
    now, released = 0.0, []
    while now < 60 and not released:  # a drop and a resume every 4 s, never a frame again
        now += 4.0
        session.connection_closed(EndReason.CONNECTION_LOST, now)
        session.attach(resumed_start(0.1), now + 0.1)
        released = session.tick(now + 0.1)
    assert released == [Release(EndReason.IDLE_TIMEOUT)] and now <= 8.0


def test_the_audio_numbering_goes_on_after_a_resume() -> None:
    session = resumable()
    receive(session, AUDIO, 10 * MS)
    session.connection_closed(EndReason.CONNECTION_LOST, now=1.0)
    session.attach(resumed_start(2.5), now=3.5)
    [published] = receive(session, AUDIO, 3600 * MS)
    assert isinstance(published, PublishAudio) and published.seq == 1


def test_a_failed_resume_is_said_right_after_the_fresh_session_start() -> None:
    session = resumable()
    error = Error(code=ErrorCode.RESUME_FAILED, msg="no session has this resume token", fatal=False)
    assert session.resume_failed(error) == []
    assert drain(session) == [error]
    assert session.phase is Phase.OPEN
