"""kyutai's `moshi.server` wire on `/api/chat`, next to ours on `/ws`, sans I/O.

Clients written for moshi.server (its web UI, `python -m moshi.client`, bench/reference_client.py) speak
this, and talk to our batched server unchanged. What moshi.server (moshi 0.2.13, `moshi/server.py`) does,
and how it maps onto our `Session`:

* Every message is binary: one kind byte, then the payload. `0x00` is the handshake, sent once by the server
  when the model is ready for this client (moshi.server: after its lock is taken; ours: at admission, where
  `/ws` sends `session_start`). `0x01` + Ogg/Opus stream bytes is audio, both ways, mono at 24 kHz
  (`sphn.OpusStreamReader`/`OpusStreamWriter`: one Ogg stream per direction per connection; the bytes of
  one message are whatever the writer released, not whole packets). `0x02` + UTF-8 is a piece of the
  model's text (a sentencepiece piece, `▁` already a space: our `Transcript`). The web UI also knows
  `0x05` + UTF-8, an error (from kyutai's Rust server); we send one before a close the server decides, so a
  client can say why. moshi's Python client logs it as an unknown kind and goes on, which is what it does.
* Incoming Ogg/Opus is decoded per session, resampled 24 -> 16 kHz (`soxr.ResampleStream`) and cut into the
  20 ms frames of `/ws`, each handed to `Session.receive` as `ClientAudio`, the same 640 bytes of PCM a
  `/ws` client's frame holds (never re-encoded as a `/ws` message for the session to decode again): every
  rule of a session (rate limit, idle timeout, drain, slot release) applies unchanged, and the rings, the
  VAD and the model never know which wire a session came in on.
* Outgoing, the session's typed outbox is translated: model audio (`ModelAudio`, 960 bytes of 24 kHz PCM)
  goes into the session's Ogg/Opus writer, `0x01` + what it releases goes out; `SessionStart` is the `0x00`,
  `Transcript` the `0x02`, a fatal `Error` (or a `SessionEnd` with none before it: a shutdown) the `0x05`;
  our other control messages (`latency`, `vad`, `pong`, `draining`) have no moshi equivalent and are not
  sent. The close is the session's (`CLOSE_CODES`, as on `/ws`).
* How it ends: moshi.server serves until the client closes the WebSocket; there is no goodbye message. Ours
  too (the session ends `client_closed`); a close the server decides (idle timeout, time limit, shutdown)
  comes after a `0x05` with the reason, with the same close code as on `/ws`.
* moshi.server ignores messages that are not binary or not of kind `0x01`, with a log line; we count
  them as malformed against the session's budget (too many in a window close it with 1008), answered with
  nothing on this wire. A text frame is handed to the session as on `/ws`, so a control message of ours
  (`ping`, `session_end`) still works. An Ogg stream that does not parse cannot be resumed (the reader
  keeps the bad bytes at its head, and a new reader lacks the stream's headers): the session ends at once,
  `0x05` + the reason, close 1008 (a protocol error's), counted as malformed. So does a stream whose
  packet grows past 16 KiB without ending (procs/network/ogg.py), which the reader would otherwise keep whole.
* Query parameters: the web UI sends sampling settings (`text_temperature`, `text_topk`,
  `audio_temperature`, `audio_topk`, `pad_mult`, `repetition_penalty_context`, `repetition_penalty`,
  `text_seed`, `audio_seed`) and `worker_auth_id`/`email`. moshi.server (Python) ignores all of them; so do
  we, because one batched model step samples every session with the server's settings (`MoshiParams` reads
  and logs them). `token` is ours: the same access check as `/ws` (procs/network/auth.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields
from typing import Final
from urllib.parse import parse_qs, urlsplit

import numpy as np
import soxr
import sphn

from procs.audio.resample import float_to_int16, int16_to_float
from procs.network.ogg import OggFraming
from procs.network.quality import QualityReport
from procs.network.session import CLOSE_CODES, Action, ClientAudio, Close, ModelAudio, Session
from procs.network.wires import AudioOut, WireOutgoing, decode_ws
from protocol import (
    IN_FRAME_SAMPLES,
    IN_RATE,
    OUT_RATE,
    EndReason,
    Error,
    ServerControl,
    SessionEnd,
    SessionStart,
    Transcript,
)

KIND_HANDSHAKE: Final = 0x00
KIND_AUDIO: Final = 0x01
KIND_TEXT: Final = 0x02
KIND_ERROR: Final = 0x05  # kyutai's Rust server and web UI; moshi.server (Python) never sends one
MOSHI_RATE: Final = 24_000  # moshi.server's Opus streams: Mimi's rate, both ways
HANDSHAKE: Final = bytes([KIND_HANDSHAKE])
BROKEN_STREAM_CLOSE: Final = CLOSE_CODES[EndReason.PROTOCOL_ERROR]
# Ogg/Opus bytes a client may send: 128 kbit/s (moshi's clients send 30-64) plus 64 KiB of catching up.
# sphn's reader keeps the whole stream it is given, so this bounds a session's memory by its length.
MAX_OGG_BYTES_PER_S: Final = 16_000
MAX_OGG_BURST_BYTES: Final = 64 * 1024
# A close frame's reason is at most 123 bytes of UTF-8.
_MAX_CLOSE_REASON: Final = 120

assert MOSHI_RATE == OUT_RATE  # model audio goes into the writer as it is, no resampling


def error_message(text: str) -> bytes:
    """`0x05` + UTF-8: the error kind moshi's web UI shows."""
    return bytes([KIND_ERROR]) + text.encode()


def shown_text(text: str) -> bytes:
    """The same reason as a `0x02` piece of text, in brackets: what kyutai's clients do show. Its web UI
    decodes `0x05` and shows nothing (a red dot, "Start Over"); `moshi.client` logs it as an unknown kind.
    Both print the model's text, so a reason sent that way is read where the conversation was."""
    return bytes([KIND_TEXT]) + f" [{text}]".encode()


def capacity_refusal(message: str) -> list[bytes]:
    """What a moshi client hears when every slot is taken, before close 1013: no handshake (nothing was
    admitted), the reason as an error and as text."""
    return [error_message(message), shown_text(message)]


@dataclass(frozen=True)
class MoshiParams:
    """The sampling settings moshi's web UI puts in the URL. Read so they can be logged and tested;
    not honoured: one batched step samples every session with the server's settings."""

    text_temperature: float | None = None
    text_topk: int | None = None
    audio_temperature: float | None = None
    audio_topk: int | None = None
    pad_mult: float | None = None
    repetition_penalty_context: int | None = None
    repetition_penalty: float | None = None
    text_seed: int | None = None
    audio_seed: int | None = None
    unreadable: tuple[str, ...] = ()  # names given with a value that is not a finite number

    def given(self) -> dict[str, float | int]:
        return {f.name: v for f in fields(self) if f.name != "unreadable" and (v := getattr(self, f.name))
                is not None}


def moshi_params(path: str) -> MoshiParams:
    """The sampling settings of an `/api/chat` request path. Never raises: moshi.server ignores the query
    string, so a value we cannot read is noted and ignored, not refused."""
    query = parse_qs(urlsplit(path).query)
    values: dict[str, float | int] = {}
    unreadable: list[str] = []
    for f in fields(MoshiParams):
        if f.name == "unreadable" or f.name not in query:
            continue
        raw = query[f.name][0]
        try:
            number = float(raw)
            if not math.isfinite(number):
                raise ValueError(raw)
            values[f.name] = int(number) if "int" in str(f.type) else number
        except (ValueError, OverflowError):
            unreadable.append(f.name)
    return MoshiParams(**values, unreadable=tuple(unreadable))  # type: ignore[arg-type]


class MoshiAdapter:
    """One `/api/chat` connection's edge: the translation between moshi's wire and its `Session` (the
    `Wire` protocol of procs/network/wires.py, as `PcmWire` and `OpusWire` are for `/ws`)."""

    def __init__(self, session: Session, params: MoshiParams | None = None) -> None:
        self.session = session
        self.params = params or MoshiParams()
        self.reader = sphn.OpusStreamReader(MOSHI_RATE)
        self.framing = OggFraming()  # bounds what the reader may hold of a packet that has not ended
        self.writer = sphn.OpusStreamWriter(MOSHI_RATE)
        self.resampler = soxr.ResampleStream(MOSHI_RATE, IN_RATE, 1, dtype="float32")
        self._pcm16 = np.zeros(0, np.int16)  # 16 kHz samples short of a whole 20 ms frame
        self._broken: str | None = None  # why the Ogg stream broke: `0x05`, the text and the close are owed
        self._broken_sent = 0  # 1: the `0x05` went out; 2: the text; 3: the close too
        self._owed: deque[bytes] = deque()  # messages that go out before anything else the session has
        # Latency of a model frame the writer is still holding: (seconds when pulled, when pulled in ns).
        self._pending_latency: tuple[float, int] | None = None
        self._said_why = False  # a fatal error went out: the `session_end` after it adds nothing
        self.samples_in = 0  # 24 kHz samples decoded from the client's stream
        self.ogg_bytes_in = 0  # Ogg bytes the client sent
        self.bytes_out = 0  # Ogg bytes sent to the client

    # ---- client -> session ------------------------------------------------------------------------------
    def receive(self, message: str | bytes, now_ns: int) -> list[Action]:
        """A WebSocket message from a moshi client."""
        session = self.session
        if self._broken is not None:
            return []
        if isinstance(message, str) or len(message) == 0 or message[0] != KIND_AUDIO:
            # Not moshi audio: `/ws`'s decoder names what is wrong and the session counts it (a text frame
            # that is one of our control messages is served, as on /ws).
            return session.receive(decode_ws(message), now_ns)
        if (why := self.framing.feed(memoryview(message)[1:])) is not None:
            # Before sphn keeps the bytes: what waits undecoded stays bounded.
            return self._break(why, now_ns)
        self.ogg_bytes_in += len(message) - 1
        allowed = MAX_OGG_BYTES_PER_S * max(0.0, now_ns / 1e9 - session.started) + MAX_OGG_BURST_BYTES
        if self.ogg_bytes_in > allowed:
            limit_kbit = MAX_OGG_BYTES_PER_S * 8 // 1000
            return self._break(f"bad Ogg/Opus stream: more than {limit_kbit} kbit/s", now_ns)
        try:
            pcm24 = self.reader.append_bytes(message[1:])
        except Exception as exc:  # sphn raises ValueError; a foreign library's failure stays with the session
            return self._break(f"bad Ogg/Opus stream: {exc}", now_ns)
        if pcm24.size == 0:
            return []
        self.samples_in += pcm24.shape[-1]
        pcm16 = float_to_int16(self.resampler.resample_chunk(np.asarray(pcm24, np.float32).reshape(-1)))
        pending = np.concatenate((self._pcm16, pcm16)) if self._pcm16.size else pcm16
        whole = len(pending) // IN_FRAME_SAMPLES * IN_FRAME_SAMPLES
        actions: list[Action] = []
        for start in range(0, whole, IN_FRAME_SAMPLES):
            # Each PublishAudio aliases its own slice of `pending`, which is never written again, so the
            # list may hold several.
            frame = memoryview(pending[start:start + IN_FRAME_SAMPLES]).cast("B")
            actions += session.receive(ClientAudio(frame), now_ns)
        self._pcm16 = pending[whole:].copy()
        return actions

    def _break(self, why: str, now_ns: int) -> list[Action]:
        """The client's Ogg stream cannot be read any further: the session is over. The session has no event
        for "the server ends this for a reason of another wire", so it is told the connection is gone (it
        releases its slot, exactly once, and sends nothing more), and this adapter says goodbye itself."""
        if self.session.end_reason is not None:  # already ending: its own close goes out
            return []
        self._broken = why
        self.session.counters.malformed += 1
        return self.session.connection_closed(EndReason.PROTOCOL_ERROR, now_ns / 1e9)

    # ---- session -> client ------------------------------------------------------------------------------
    def wants_to_send(self) -> bool:
        if self._broken is not None:
            return self._broken_sent < 3
        return bool(self._owed) or self.session.wants_to_send()

    def close(self) -> None:
        """Nothing to free at once: sphn's reader and writer go with the adapter."""

    def next_outgoing(self, now_ns: int) -> WireOutgoing | None:
        """The next message for the moshi client (bytes), model audio (`AudioOut` of Ogg bytes), the close;
        a quality report as it is (for the server's metrics)."""
        if self._broken is not None:
            self._broken_sent += 1
            if self._broken_sent == 1:
                return error_message(self._broken)
            if self._broken_sent == 2:
                return shown_text(self._broken)
            if self._broken_sent == 3:
                return Close(BROKEN_STREAM_CLOSE, _close_reason(self._broken))
            return None
        if self._owed:
            return self._owed.popleft()
        while (item := self.session.next_outgoing(now_ns)) is not None:
            if isinstance(item, Close | QualityReport):
                return item
            if isinstance(item, ModelAudio):
                if (out := self._audio(item, now_ns)) is not None:
                    return out
            elif (message := self._control(item)) is not None:
                return message
        return None

    def _audio(self, item: ModelAudio, now_ns: int) -> AudioOut | None:
        pcm = int16_to_float(np.frombuffer(item.pcm, "<i2"))
        if item.latency_s is not None and self._pending_latency is None:
            self._pending_latency = (item.latency_s, now_ns)
        ogg = self.writer.append_pcm(pcm)
        if len(ogg) == 0:  # the writer packs two 20 ms frames per page: the other half comes next
            return None
        latency_s = None
        if self._pending_latency is not None:  # the frame that completed a block left with these bytes
            pulled_s, pulled_ns = self._pending_latency
            latency_s = pulled_s + (now_ns - pulled_ns) / 1e9
            self._pending_latency = None
        self.bytes_out += len(ogg)
        return AudioOut(bytes([KIND_AUDIO]) + ogg, latency_s)

    def _control(self, msg: ServerControl) -> bytes | None:
        match msg:
            case SessionStart():
                return HANDSHAKE
            case Transcript(text=piece):
                return bytes([KIND_TEXT]) + piece.encode()
            case Error(fatal=True, msg=why):
                self._said_why = True
                self._owed.append(shown_text(why))
                return error_message(why)
            case SessionEnd(reason=reason) if not self._said_why:  # a goodbye with no error before it
                self._owed.append(shown_text(f"session over: {reason}"))
                return error_message(f"session over: {reason}")
        return None


def _close_reason(text: str) -> str:
    """At most _MAX_CLOSE_REASON bytes of UTF-8, cut on a character boundary."""
    return text.encode()[:_MAX_CLOSE_REASON].decode(errors="ignore")
