"""moshi.server's wire on `/api/chat` (procs/network/moshi_api.py).

The adapter alone, without a socket; then the real supervisor with its three processes on loopback, driven
by bench/reference_client.py's `ReferenceClient` (the Opus client the side-by-side benchmark runs against
kyutai's own `moshi.server`) and by aiohttp, the library moshi's Python client is built on: the loopback
engine (what goes in comes out) and the demo checkpoint, several sessions at once, refusals, garbage.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import sphn

from bench.capacity_cpu import scrape_metrics
from bench.reference_client import ReferenceClient, StreamPlan, run_sessions
from procs.audio.resample import Resampler16to24
from procs.client import stream_client
from procs.config import ServerConfig
from procs.frames import ModelFrame
from procs.network import moshi_api
from procs.network.auth import Access
from procs.network.http import Health, HttpRoutes
from procs.network.moshi_api import HANDSHAKE, MAX_OGG_BURST_BYTES, MoshiAdapter, moshi_params
from procs.network.ogg import OggFraming
from procs.network.session import ClientAudio, Close, PublishAudio, Release, Session, SessionRules
from procs.network.wires import AudioOut
from protocol import EndReason, SessionEnd, session_start
from tests.support.helpers import wait_for_sessions
from tests.support.launcher import ServerProcess
from tests.support.speech import telugu_speech_16k

# Listen until every frame sent is answered (the loopback engine answers each), 5 s at most.
ALL_BACK = {"until_frames": -1, "tail_s": 5.0}

RATE = 24_000
FRAME = 480  # 20 ms at 24 kHz
TOKEN = "moshi-test-token"
# What moshi's web UI puts in the URL (client/src/pages/Conversation/Conversation.tsx: buildURL).
WEB_UI_QUERY = ("text_temperature=0.7&text_topk=25&audio_temperature=0.8&audio_topk=250&pad_mult=0"
                "&text_seed=123456&audio_seed=654321&repetition_penalty_context=64&repetition_penalty=1"
                "&worker_auth_id=abc&email=someone%40example.org")

pytestmark = pytest.mark.loopback_server("--max-sessions", "4")


# --- helpers -----------------------------------------------------------------------------------------------


def speech(seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Telugu speech: int16 at 16 kHz (for /ws) and float32 at 24 kHz (moshi's wire), whole 80 ms blocks."""
    pcm16 = telugu_speech_16k()
    pcm16 = np.resize(pcm16, int(seconds * 16000) // 1280 * 1280)
    return pcm16, Resampler16to24().process(pcm16).astype(np.float32)


def ws_base(server: ServerProcess) -> str:
    return server.url.replace("http", "ws", 1)


def health(server: ServerProcess) -> dict:
    status, body = server.health()
    assert status in (200, 503), status
    return body


class RecordingClient(ReferenceClient):
    """The benchmark's reference client, also keeping every message's kind, the decoded audio and the text."""

    def __init__(self, index: int, pcm24: np.ndarray) -> None:
        super().__init__(index, pcm24)
        self.kinds: list[int] = []
        self.received: list[np.ndarray] = []
        self.texts: list[str] = []

    def handle(self, message: str | bytes, t: float) -> None:
        if isinstance(message, bytes) and message:
            self.kinds.append(message[0])
            if message[0] == 1:  # decoded here, not again by the parent (its reader is a stream)
                pcm = self.reader.append_bytes(message[1:])
                self.received.append(pcm)
                if pcm.shape[-1]:
                    self._record_audio(t, pcm.shape[-1])
                return
            if message[0] == 2:
                self.texts.append(message[1:].decode())
        super().handle(message, t)

    @property
    def pcm(self) -> np.ndarray:
        return np.concatenate(self.received) if self.received else np.zeros(0, np.float32)


def run_reference_clients(server: ServerProcess, pcm24: np.ndarray, n: int, tail_s: float = 1.0,
                          query: str = "") -> list[RecordingClient]:
    frames = len(pcm24) // FRAME

    async def go() -> list[RecordingClient]:
        loop = asyncio.get_running_loop()
        clients = [RecordingClient(i, pcm24) for i in range(n)]
        for client in clients:
            client.path += query
        # A different phase of the 20 ms clock each, as real people would have.
        plans = [StreamPlan(loop.time() + 0.3 + 0.007 * i, tail_s=tail_s, patience_s=10.0) for i in range(n)]
        await run_sessions(clients, ws_base(server), frames, plans)  # type: ignore[arg-type]
        return clients

    return asyncio.run(go())


def best_correlation(sent: np.ndarray, got: np.ndarray, max_lag: int) -> tuple[float, int]:
    """The normalised correlation of `got` with `sent` at the delay (0..max_lag samples) where their
    cross-correlation (by FFT) peaks, and that delay."""
    n = min(len(sent), len(got) - max_lag)
    size = 1 << (n + len(got)).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(got, size) * np.conj(np.fft.rfft(sent[:n], size)), size)
    lag = int(np.argmax(xcorr[:max_lag]))
    return float(np.corrcoef(sent[:n], got[lag:lag + n])[0, 1]), lag


def ogg_stream(pcm24: np.ndarray) -> list[bytes]:
    """The `0x01` messages moshi's clients send for this audio: whatever the writer releases, per 20 ms."""
    writer = sphn.OpusStreamWriter(RATE)
    out = []
    for i in range(len(pcm24) // FRAME):
        ogg = writer.append_pcm(pcm24[i * FRAME:(i + 1) * FRAME])
        if len(ogg):
            out.append(b"\x01" + ogg)
    return out


# --- the adapter alone -------------------------------------------------------------------------------------


def new_adapter(path: str = "/api/chat") -> MoshiAdapter:
    start = session_start("s1", model="m", demo_weights=False, max_sessions=4)
    return MoshiAdapter(Session(start, slot=0, gen=1, now=0.0), moshi_params(path))


def model_frame(pcm: np.ndarray, block_pos: int) -> ModelFrame:
    return ModelFrame(seq=0, t_in_ns=0, gen=1, block_pos=block_pos, queue_us=0, step_us=0, resample_us=0,
                      dropped=0, realigned=0, pcm=pcm.astype("<i2").tobytes())


def test_adapter_turns_ogg_in_into_20ms_frames_and_model_audio_into_ogg_out() -> None:
    adapter = new_adapter()
    _, pcm24 = speech(1.0)
    published = []
    for i, message in enumerate(ogg_stream(pcm24)):
        actions = adapter.receive(message, now_ns=i * 40_000_000)
        published += [a for a in actions if isinstance(a, PublishAudio)]
    assert all(len(a.pcm) == 640 for a in published)
    # 1 s in: the Opus writer's and the resampler's start-up hold back a few frames, never more.
    assert 45 <= len(published) <= 50, len(published)
    assert adapter.next_outgoing(0) == HANDSHAKE  # the handshake is the first thing out
    reader = sphn.OpusStreamReader(RATE)
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(50 * FRAME) / RATE)).astype(np.int16)
    decoded = []
    for k in range(50):
        adapter.session.model_audio(model_frame(tone[k * FRAME:(k + 1) * FRAME], k % 4))
        while (item := adapter.next_outgoing(k * 20_000_000)) is not None:
            assert isinstance(item, AudioOut) and item.data[0] == 1
            decoded.append(reader.append_bytes(item.data[1:]))
    out = np.concatenate(decoded)
    assert abs(len(out) - 50 * FRAME) <= 2 * FRAME  # at most the writer's half page is still held
    assert np.sqrt(np.mean(out[FRAME:] ** 2)) == pytest.approx(8000 / 32768 / np.sqrt(2), rel=0.15)


class RecordingSession(Session):
    """A real session that keeps what its edge handed it."""

    def __init__(self) -> None:
        super().__init__(session_start("s1", model="m", demo_weights=False, max_sessions=4), 0, 1, now=0.0)
        self.inputs: list[object] = []

    def receive(self, decoded: object, now_ns: int) -> list:
        self.inputs.append(decoded)
        return super().receive(decoded, now_ns)  # type: ignore[arg-type]


def test_api_chat_hands_its_session_the_pcm_it_decoded_and_never_decodes_what_we_encoded() -> None:
    session = RecordingSession()
    adapter = MoshiAdapter(session)
    for i, message in enumerate(ogg_stream(speech(0.5)[1])):
        adapter.receive(message, now_ns=i * 40_000_000)
    assert session.inputs and all(isinstance(x, ClientAudio) and x.decode is None and x.data.nbytes == 640
                                  for x in session.inputs)  # PCM as sphn decoded it: no /ws frame to parse
    # Structurally: the moshi edge neither writes a /ws message for its session to parse nor parses one the
    # session wrote; what it takes from the session is typed (Struct, ModelAudio, Close, QualityReport).
    tree = ast.parse(inspect.getsource(moshi_api))
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for alias in node.names}
    ours = {"encode_client_audio", "decode_client_audio", "decode_client", "encode_server_audio",
            "decode_server_audio", "encode_server_control", "decode_server_control", "decode_server"}
    assert used & ours == set()


def test_adapter_sends_text_and_fatal_errors_only() -> None:
    adapter = new_adapter()
    adapter.session.model_text(" నమస్కారం", 80.0)
    adapter.session.voice_activity("start", 100.0)  # no moshi equivalent: not sent
    messages = [adapter.next_outgoing(0), adapter.next_outgoing(0), adapter.next_outgoing(0)]
    assert messages == [HANDSHAKE, b"\x02" + " నమస్కారం".encode(), None]
    assert adapter.receive(b"\x07unknown kind", 0) == []  # counted, not answered: moshi ignores them
    assert adapter.next_outgoing(0) is None and adapter.session.counters.malformed == 1
    actions = adapter.session.tick(31.0)  # no audio for the idle timeout
    assert actions == [Release(adapter.session.end_reason)]
    assert adapter.next_outgoing(0) == b"\x05no audio for 30 s: the session is closed"
    # kyutai's clients show text, not 0x05: the reason again, as a piece of text in brackets.
    assert adapter.next_outgoing(0) == b"\x02 [no audio for 30 s: the session is closed]"
    assert adapter.next_outgoing(0) == Close(1000, "idle timeout")


def test_adapter_says_why_a_shutdown_or_a_time_limit_ends_it_once() -> None:
    adapter = new_adapter()
    adapter.session.shutdown()
    assert [adapter.next_outgoing(0) for _ in range(4)] == [
        HANDSHAKE, b"\x05session over: server_shutdown", b"\x02 [session over: server_shutdown]",
        Close(1001, "server shutting down")]
    start = session_start("s2", model="m", demo_weights=False, max_sessions=4)
    rules = SessionRules.of(ServerConfig(max_session_s=5.0))
    limited = MoshiAdapter(Session(start, 0, 1, now=0.0, rules=rules))
    limited.receive(ogg_stream(speech(0.2)[1])[0], 0)
    limited.session.tick(5.0)
    assert [limited.next_outgoing(0) for _ in range(4)] == [
        HANDSHAKE, b"\x05sessions last at most 5 s on this server",
        b"\x02 [sessions last at most 5 s on this server]", Close(1000, "session time limit")]


def test_adapter_ends_a_broken_ogg_stream_once_with_1008() -> None:
    adapter = new_adapter()
    assert adapter.next_outgoing(0) == HANDSHAKE
    ogg = ogg_stream(speech(0.5)[1])
    adapter.receive(ogg[0], 0)
    actions = adapter.receive(b"\x01" + b"this is not an Ogg page at all, " * 4, 0)
    assert [type(a) for a in actions] == [Release]
    assert adapter.receive(ogg[1], 0) == []  # nothing more is read
    error, text, close = adapter.next_outgoing(0), adapter.next_outgoing(0), adapter.next_outgoing(0)
    assert isinstance(error, bytes) and error.startswith(b"\x05bad Ogg/Opus stream")
    assert text == b"\x02 [" + error[1:] + b"]"
    assert isinstance(close, Close) and close.code == 1008 and close.reason.startswith("bad Ogg/Opus stream")
    assert len(close.reason.encode()) <= 123
    assert adapter.next_outgoing(0) is None and not adapter.wants_to_send()
    # The slot was given back once, not twice.
    assert adapter.session.connection_closed(EndReason.CLIENT_CLOSED, 0.0) == []


def test_web_ui_settings_are_read_and_bad_values_ignored() -> None:
    params = moshi_params("/api/chat?" + WEB_UI_QUERY)
    assert params.given() == {"text_temperature": 0.7, "text_topk": 25, "audio_temperature": 0.8,
                              "audio_topk": 250, "pad_mult": 0.0, "repetition_penalty_context": 64,
                              "repetition_penalty": 1.0, "text_seed": 123456, "audio_seed": 654321}
    odd = moshi_params("/api/chat?text_temperature=warm&audio_topk=nan&text_seed=7")
    assert odd.given() == {"text_seed": 7} and odd.unreadable == ("text_temperature", "audio_topk")


@pytest.mark.parametrize(("refusal", "token", "status"), [
    ("draining", TOKEN, 503), ("starting", TOKEN, 503), (None, None, 401), (None, "wrong", 403),
    (None, TOKEN, None),
])
def test_api_chat_passes_the_admission_of_ws(refusal: str | None, token: str | None, status: int | None
                                              ) -> None:
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    routes = HttpRoutes(
        Path(__file__).resolve().parent.parent / "web",
        lambda: Health("ok", 0, 4, "m", "moshi", False), lambda: "", lambda: refusal,
        Access(auth_token=TOKEN))
    query = f"?{WEB_UI_QUERY}" + (f"&token={token}" if token else "")
    for path in ("/ws", "/api/chat"):
        response = routes.respond(Request(path + query, Headers({"Host": "localhost"})))
        assert (None if response is None else response.status_code) == status, path
    foreign = Headers({"Host": "localhost", "Origin": "https://elsewhere.example"})
    denied = routes.respond(Request(f"/api/chat?token={TOKEN}", foreign))
    assert denied is not None and denied.status_code == 403
    # `codec` is our /ws's parameter; on moshi's path it is one more query parameter, never a refusal.
    if refusal is None and token == TOKEN:
        for codec in ("opus", "foo"):
            request = Request(f"/api/chat?codec={codec}&token={TOKEN}", Headers({"Host": "localhost"}))
            assert routes.respond(request) is None
        bad = routes.respond(Request(f"/ws?codec=foo&token={TOKEN}", Headers({})))
        assert bad is not None and bad.status_code == 400


# --- real processes ----------------------------------------------------------------------------------------


def test_three_reference_clients_at_once_hear_their_own_audio(loopback_server: ServerProcess) -> None:
    _, pcm24 = speech(3.0)
    clients = run_reference_clients(loopback_server, pcm24, 3)
    sent_s = len(pcm24) / RATE
    for client in clients:
        trace = client.trace
        assert trace.error is None, trace.error
        assert client.kinds[0] == 0 and client.kinds.count(0) == 1, client.kinds[:5]  # the handshake, first
        assert set(client.kinds) == {0, 1}  # the loopback engine has no text
        got_s = trace.audio_samples / RATE
        assert abs(got_s - sent_s) <= 0.1, (got_s, sent_s)
        # Two lossy Opus passes (in, out) and 24 -> 16 -> 24 kHz: the waveform survives well short of 1
        # (it comes out near 0.9), an unrelated signal would give about 0.
        corr, lag = best_correlation(pcm24, client.pcm, max_lag=RATE // 10)
        assert corr > 0.8, f"client {client.trace.index}: correlation {corr:.3f} at lag {lag}"
    wait_for_sessions(loopback_server, 0)
    log = loopback_server.log()
    assert log.count("on moshi's /api/chat") >= 3
    assert log.count("ended (client_closed)") >= 3


def test_our_codec_parameter_does_not_change_moshis_wire(loopback_server: ServerProcess) -> None:
    """`/api/chat?codec=opus` is moshi's Ogg/Opus wire like any other /api/chat session (the session under
    the adapter speaks PCM): not refused frame by frame as PCM in an Opus session."""
    _, pcm24 = speech(1.5)
    (client,) = run_reference_clients(loopback_server, pcm24, 1, query="?codec=opus")
    assert client.trace.error is None, client.trace.error
    assert abs(client.trace.audio_samples / RATE - len(pcm24) / RATE) <= 0.1
    wait_for_sessions(loopback_server, 0)


def test_garbage_on_api_chat_ends_clearly_and_spares_a_ws_session(loopback_server: ServerProcess) -> None:
    pcm16, pcm24 = speech(4.0)
    ogg = ogg_stream(pcm24[: RATE])  # one second of a valid stream first

    async def garbage() -> tuple[list[bytes], int | None]:
        kinds: list[bytes] = []
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_base(loopback_server) + "/api/chat"
                                                                     ) as ws:
            first = await ws.receive()
            assert first.type == aiohttp.WSMsgType.BINARY and first.data == HANDSHAKE
            for i, message in enumerate(ogg):
                await ws.send_bytes(message)
                if i == 5:  # moshi.server ignores other kinds and text; so do we (counted)
                    await ws.send_bytes(b"\x07what is this")
                    await ws.send_str("not moshi")
                await asyncio.sleep(0.04)  # the client's pace: one page per 40 ms
            await ws.send_bytes(b"\x01" + b"\x00garbage that is no Ogg page\xff" * 8)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    kinds.append(msg.data[:1] if msg.data[:1] != b"\x05" else msg.data)
            return kinds, ws.close_code

    async def both():
        neighbour = asyncio.create_task(stream_client(ws_base(loopback_server) + "/ws", pcm16, **ALL_BACK))
        bad = await garbage()
        return bad, await neighbour

    (kinds, code), neighbour = asyncio.run(both())
    assert code == 1008
    errors = [k for k in kinds if k[:1] == b"\x05"]
    assert len(errors) == 1 and errors[0].startswith(b"\x05bad Ogg/Opus stream"), errors
    assert kinds[-2:] == [errors[0], b"\x02"]  # the error, then its text, are the last before the close
    assert b"\x01" in kinds  # audio came back before the garbage
    # The /ws session beside it went on to its own end, untouched.
    assert neighbour.close_code == 1000 and isinstance(neighbour.controls[-1][1], SessionEnd)
    assert len(neighbour.frames) >= 0.95 * len(pcm16) // 320
    wait_for_sessions(loopback_server, 0)
    assert loopback_server.proc.poll() is None and health(loopback_server)["status"] == "ok"
    assert "restart" not in loopback_server.log().split("ready in", 1)[1]


@pytest.fixture(scope="module")
def guarded_server():
    """Two slots, a token, a short idle timeout."""
    with ServerProcess("--engine", "loopback", "--max-sessions", "2", "--auth-token", TOKEN,
                       "--idle-timeout", "3") as server:
        yield server


def moshi_client_uri(url: str) -> str:
    """The URI `python -m moshi.client --url URL` connects to (moshi/client.py: run): it appends /api/chat,
    so a token goes in as `URL = ws://host:port/api/chat?token=T&_=`."""
    proto, without_proto = url.split("://", 1)
    proto = "ws" if proto in ("ws", "http") else "wss"
    return f"{proto}://{without_proto}/api/chat"


def test_moshi_clients_are_let_in_with_a_token_refused_when_full_and_idled_out(guarded_server: ServerProcess
                                                                               ) -> None:
    base = ws_base(guarded_server)
    with_token = moshi_client_uri(f"{base}/api/chat?token={TOKEN}&{WEB_UI_QUERY}&_=")

    async def scenario():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as no_token:
                await http.ws_connect(moshi_client_uri(base))
            holders = [await http.ws_connect(with_token) for _ in range(2)]
            handshakes = [(await ws.receive()).data for ws in holders]
            full = await asyncio.to_thread(health, guarded_server)
            refused = await http.ws_connect(with_token)
            refusal = [await refused.receive(), await refused.receive(), await refused.receive()]
            # The holders send nothing: the idle timeout ends them with its reason.
            endings = []
            for ws in holders:
                got = [msg async for msg in ws]
                endings.append(([m.data for m in got if m.type == aiohttp.WSMsgType.BINARY], ws.close_code))
            return no_token.value.status, handshakes, full, refusal, refused.close_code, endings

    t0 = time.monotonic()
    status, handshakes, full, refusal, refused_code, endings = asyncio.run(scenario())
    assert status == 401
    assert handshakes == [HANDSHAKE, HANDSHAKE]
    assert full["status"] == "full" and full["sessions_active"] == 2
    assert refusal[0].type == aiohttp.WSMsgType.BINARY and refusal[0].data == b"\x05Server at capacity"
    assert refusal[1].type == aiohttp.WSMsgType.BINARY and refusal[1].data == b"\x02 [Server at capacity]"
    assert refusal[2].type == aiohttp.WSMsgType.CLOSE and refusal[2].data == 1013
    assert refusal[2].extra == "Server at capacity" and refused_code == 1013
    for messages, code in endings:
        assert messages == [b"\x05no audio for 3 s: the session is closed",
                            b"\x02 [no audio for 3 s: the session is closed]"] and code == 1000
    assert time.monotonic() - t0 < 10
    wait_for_sessions(guarded_server, 0)
    log = guarded_server.log()
    assert "text_temperature" in log and "someone" not in log and TOKEN not in log


def test_demo_model_talks_to_two_reference_clients(demo_checkpoint: str) -> None:
    _, pcm24 = speech(4.0)
    with ServerProcess("--max-sessions", "4") as server:
        clients = run_reference_clients(server, pcm24, 2, tail_s=3.0)
        sent_s = len(pcm24) / RATE
        metrics = scrape_metrics(server.url)
        dropped_s = metrics.get("voice_input_frames_dropped_total", 0.0) * 0.02
        for client in clients:
            trace = client.trace
            assert trace.error is None, trace.error
            assert client.kinds[0] == 0
            got_s = trace.audio_samples / RATE
            # Every 80 ms block is answered, or counted as never heard when the CPU cannot keep up (how fast
            # the demo model runs is the benchmarks' business): at most the model's first block is owed.
            assert sent_s - 0.2 - dropped_s <= got_s <= sent_s + 0.1, (got_s, sent_s, dropped_s)
            assert trace.text_pieces > 0 and all(client.texts), client.texts[:10]
        wait_for_sessions(server, 0)
        status, body = urllib_get(server.url + "/metrics")
        assert status == 200 and "voice_frames_out_total" in body


def urllib_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()



def test_a_drain_refuses_new_moshi_clients_and_ends_live_ones_with_their_reason() -> None:
    server = ServerProcess("--engine", "loopback", "--max-sessions", "2", "--drain-timeout", "1")
    pcm24 = speech(10.0)[1]

    async def scenario() -> tuple[int, list[bytes], int | None, int]:
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_base(server) + "/api/chat") as live:
            assert (await live.receive()).data == HANDSHAKE
            pages = ogg_stream(pcm24)

            async def talk() -> None:
                for page in pages:
                    if live.closed:
                        return
                    await live.send_bytes(page)
                    await asyncio.sleep(0.04)  # the client's pace: one page per 40 ms

            talker = asyncio.create_task(talk())
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while (await asyncio.to_thread(health, server)).get("status") != "draining":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)  # polls /health; the deadline is the bound
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(ws_base(server) + "/api/chat")
            errors = [m.data async for m in live
                      if m.type == aiohttp.WSMsgType.BINARY and m.data[:1] == b"\x05"]
            talker.cancel()
            # One SIGTERM: the drain runs out, the goodbye goes, the supervisor exits by itself.
            exit_code = await asyncio.to_thread(server.proc.wait, 20)
            return refused.value.status, errors, live.close_code, exit_code

    with server:
        status, errors, code, exit_code = asyncio.run(scenario())
    assert status == 503
    assert errors == [b"\x05session over: server_shutdown"] and code == 1001
    assert exit_code == 0, server.log()[-3000:]


def endless_packet_pages(pages: int, serial: int = 1, seq0: int = 2) -> list[bytes]:
    """Ogg pages of the same stream, each 255 segments of 255 bytes that continue one packet (RFC 3533:
    every lacing value 255, so the packet never ends)."""
    out = []
    for i in range(pages):
        header = (b"OggS" + bytes([0, 1 if i else 0]) + (0).to_bytes(8, "little", signed=True)
                  + serial.to_bytes(4, "little") + (seq0 + i).to_bytes(4, "little") + bytes(4) + bytes([255]))
        out.append(b"\x01" + header + bytes([255]) * 255 + bytes(255 * 255))
    return out


def test_an_ogg_packet_that_never_ends_is_refused_before_it_is_held() -> None:
    # A hostile client: valid Opus headers, then 65 KB pages that each continue the same packet. sphn's
    # reader would keep every byte and return nothing; the session ends at the first such page, 0x05 + 1008.
    adapter = new_adapter()
    assert adapter.next_outgoing(0) == HANDSHAKE
    ogg = ogg_stream(speech(0.5)[1])
    for message in ogg[:2]:  # OpusHead, OpusTags and the first audio
        adapter.receive(message, 0)
    malformed = adapter.session.counters.malformed
    serial = int.from_bytes(ogg[0][1 + 14:1 + 18], "little")
    actions = adapter.receive(endless_packet_pages(1, serial)[0], 0)
    assert [type(a) for a in actions] == [Release]
    error, _, close = adapter.next_outgoing(0), adapter.next_outgoing(0), adapter.next_outgoing(0)
    assert isinstance(error, bytes) and error.startswith(b"\x05bad Ogg/Opus stream: a packet longer than")
    assert isinstance(close, Close) and close.code == 1008
    assert adapter.session.counters.malformed == malformed + 1
    assert all(adapter.receive(page, 0) == [] for page in endless_packet_pages(20))  # nothing more is read


def test_ogg_framing_follows_pages_split_anywhere() -> None:
    stream = b"".join(m[1:] for m in ogg_stream(speech(2.0)[1]))
    for chunk in (1, 7, 300, len(stream)):
        framing = OggFraming()
        assert all(framing.feed(stream[i:i + chunk]) is None for i in range(0, len(stream), chunk))
        assert framing.pages >= 2 and framing.packet_bytes == 0
    assert OggFraming().feed(b"OggX") is not None and OggFraming().feed(b"Og") is None


def test_audio_a_moshi_client_sends_before_the_handshake_is_kept_and_counted(loopback_server: ServerProcess
                                                                            ) -> None:
    # moshi.client sends as soon as the WebSocket opens, without waiting for 0x00: every frame of it counts.
    _, pcm24 = speech(1.0)
    pages = ogg_stream(pcm24)
    wait_for_sessions(loopback_server, 0)
    before = scrape_metrics(loopback_server.url)

    async def scenario() -> bytes:
        url = ws_base(loopback_server) + "/api/chat"
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            for page in pages:  # all of it before reading anything, the handshake included
                await ws.send_bytes(page)
            first = await ws.receive()
            await ws.close()
            return first.data

    assert asyncio.run(scenario()) == HANDSHAKE
    wait_for_sessions(loopback_server, 0)
    frames_in = scrape_metrics(loopback_server.url)["voice_frames_in_total"] - before["voice_frames_in_total"]
    decoded = sphn.OpusStreamReader(RATE)
    samples = sum(decoded.append_bytes(page[1:]).shape[-1] for page in pages)
    # All of it but what the 24 -> 16 kHz resampler still holds (a few ms: one frame at most).
    assert samples * 16_000 // RATE // 320 - 1 <= frames_in <= samples * 16_000 // RATE // 320, frames_in


def tags_pages(serial: int, pages: int, seq0: int = 2) -> list[bytes]:
    """Ogg pages of one stream, each one complete 1,000-byte packet that starts like OpusTags: sphn's reader
    skips such a packet (no audio, no error) and keeps its bytes."""
    body = b"OpusTags" + bytes(992)
    lacing = bytes([255, 255, 255, 235])
    return [b"\x01" + b"OggS" + bytes([0, 0]) + bytes(8) + serial.to_bytes(4, "little")
            + (seq0 + i).to_bytes(4, "little") + bytes(4) + bytes([len(lacing)]) + lacing + body
            for i in range(pages)]


def adapter_past_the_headers() -> tuple[MoshiAdapter, int]:
    """An adapter past its handshake that has read a real stream's first page; the stream's serial."""
    adapter = new_adapter()
    assert adapter.next_outgoing(0) == HANDSHAKE
    first = ogg_stream(speech(0.5)[1])[0]
    adapter.receive(first, 0)
    return adapter, int.from_bytes(first[1 + 14:1 + 18], "little")


def test_a_stream_of_packets_that_decode_to_nothing_is_bounded_in_rate() -> None:
    adapter, serial = adapter_past_the_headers()
    released = []
    for page in tags_pages(serial, 100):  # 100 KB at once, no audio from any of it
        released += adapter.receive(page, 0)
        if released:
            break
    assert [type(a) for a in released] == [Release]
    assert adapter.ogg_bytes_in <= MAX_OGG_BURST_BYTES + 1100
    error = adapter.next_outgoing(0)
    assert isinstance(error, bytes) and error.startswith(b"\x05bad Ogg/Opus stream: more than 128 kbit/s")


def test_a_second_logical_ogg_stream_is_refused() -> None:
    adapter, serial = adapter_past_the_headers()
    assert [type(a) for a in adapter.receive(tags_pages(serial ^ 1, 1)[0], 0)] == [Release]
    error = adapter.next_outgoing(0)
    assert isinstance(error, bytes) and error.startswith(b"\x05bad Ogg/Opus stream: a second logical stream")
