"""Benchmark clients that drive our server and kyutai's reference `moshi.server` the same way.

Both stream the same speech at real-time pace in 20 ms frames, starting as soon as the WebSocket is open
(as the stock clients do: neither waits for the server's handshake), and record the time every input frame
left and every piece of output audio arrived. Only the wire protocol differs:

- ours (`/ws`): 0x01 + 640 bytes of 16 kHz s16le per frame in; 0x02 + 960 bytes of 24 kHz s16le per 20 ms
  out; JSON control frames (`session_start` is the handshake; `latency` carries the server's own count of
  dropped input frames).
- reference (`/api/chat`): 24 kHz float PCM through `sphn.OpusStreamWriter` in, sent as 0x01 + Ogg/Opus
  bytes whenever the writer releases some (it packs 40 ms per Opus packet, so every second 20 ms frame);
  out, 0x00 is the handshake, 0x01 + Ogg/Opus (decoded here with `sphn.OpusStreamReader`), 0x02 + text.

After its last frame a client stays connected until no audio came for `tail_s` (once it has its handshake),
or until `patience_s` after its last frame, whichever is first: a client that the reference server keeps
waiting behind its lock is thereby watched for a while after it stopped talking.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from protocol import (
    IN_FRAME_SAMPLES,
    OUT_FRAME_SAMPLES,
    ClientSessionEnd,
    Latency,
    ProtocolError,
    SessionStart,
    Transcript,
    decode_server,
    encode_client_audio,
    encode_client_control,
)
from tests.support.helpers import FRAME_S

REFERENCE_RATE = 24_000
REFERENCE_FRAME_SAMPLES = REFERENCE_RATE * 20 // 1000  # 480
MAX_MESSAGE_BYTES = 2**20


@dataclass
class SessionTrace:
    """What one client sent and saw; all times are the client event loop's clock (seconds)."""

    index: int
    t_connected: float | None = None
    t_handshake: float | None = None  # ours: `session_start`; reference: the 0x00 byte
    send_times: list[float] = field(default_factory=list)  # when input frame i had been handed to the socket
    audio: list[tuple[float, int]] = field(default_factory=list)  # (arrival, samples at 24 kHz) per message
    text_pieces: int = 0
    session_id: str | None = None  # ours only, from `session_start`
    # Ours only: (arrival, the session's cumulative `dropped_frames`) from each `latency` message.
    drop_reports: list[tuple[float, int]] = field(default_factory=list)
    # Ours only: the first input frames our server skipped to place the session on its step clock (every
    # `latency` message says; None until one came).
    skipped_frames: int | None = None
    t_stream_end: float | None = None
    t_closed: float | None = None
    error: str | None = None

    @property
    def audio_samples(self) -> int:
        return sum(n for _, n in self.audio)

    @property
    def server_dropped_frames(self) -> int:
        return max((n for _, n in self.drop_reports), default=0)


@dataclass(frozen=True)
class StreamPlan:
    """When a client starts streaming and how long it lingers afterwards."""

    start_at: float  # event-loop time of the first frame
    tail_s: float = 1.0
    patience_s: float = 10.0


class _SessionClient:
    """Shared pacing, receiving and lingering; subclasses say how frames are encoded and messages read."""

    path = ""

    def __init__(self, index: int) -> None:
        self.trace = SessionTrace(index)
        self.audio_event = asyncio.Event()  # set on every audio message and on the handshake

    def payload(self, frame_index: int) -> str | bytes | None:  # None: nothing to send for this frame
        raise NotImplementedError

    def handle(self, message: str | bytes, t: float) -> None:
        raise NotImplementedError

    async def goodbye(self, ws: ClientConnection) -> None:
        """Ends the session politely before closing the socket."""

    def _record_audio(self, t: float, samples: int) -> None:
        self.trace.audio.append((t, samples))
        self.audio_event.set()

    def _record_handshake(self, t: float) -> None:
        if self.trace.t_handshake is None:
            self.trace.t_handshake = t
        self.audio_event.set()

    async def run(self, base_url: str, n_frames: int, plan: StreamPlan) -> SessionTrace:
        loop = asyncio.get_running_loop()
        trace = self.trace
        try:
            async with connect(base_url + self.path, compression=None, max_size=MAX_MESSAGE_BYTES) as ws:
                trace.t_connected = loop.time()
                receiver = asyncio.create_task(self._receive(ws))
                try:
                    await self._stream(ws, n_frames, plan.start_at)
                    await self._linger(plan)
                    await self.goodbye(ws)
                except ConnectionClosed as exc:
                    trace.error = f"closed by server: {exc}"
                finally:
                    receiver.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await receiver
        except (OSError, InvalidHandshake) as exc:
            trace.error = f"connect failed: {exc!r}"
        trace.t_closed = loop.time()
        return trace

    async def _stream(self, ws: ClientConnection, n_frames: int, start_at: float) -> None:
        loop = asyncio.get_running_loop()
        for i in range(n_frames):
            # Frame i leaves at start_at + i * 20 ms, as a microphone would deliver it.
            delay = start_at + i * FRAME_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            message = self.payload(i)
            if message is not None:
                await ws.send(message)
            self.trace.send_times.append(loop.time())
        self.trace.t_stream_end = loop.time()

    async def _linger(self, plan: StreamPlan) -> None:
        loop = asyncio.get_running_loop()
        trace = self.trace
        assert trace.t_stream_end is not None
        hard_deadline = trace.t_stream_end + plan.patience_s
        while True:
            now = loop.time()
            if trace.t_handshake is not None:
                last_audio = trace.audio[-1][0] if trace.audio else trace.t_handshake
                quiet_deadline = max(last_audio, trace.t_stream_end) + plan.tail_s
            else:
                quiet_deadline = hard_deadline
            deadline = min(hard_deadline, quiet_deadline)
            if now >= deadline:
                return
            self.audio_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.audio_event.wait(), timeout=deadline - now)

    async def _receive(self, ws: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                self.handle(message, loop.time())


class OursClient(_SessionClient):
    """Our protocol: raw PCM both ways, JSON control frames."""

    path = "/ws"

    def __init__(self, index: int, pcm16: np.ndarray) -> None:
        super().__init__(index)
        self.pcm16 = pcm16

    def payload(self, frame_index: int) -> bytes:
        start = frame_index * IN_FRAME_SAMPLES
        return encode_client_audio(self.pcm16[start : start + IN_FRAME_SAMPLES].tobytes())

    def handle(self, message: str | bytes, t: float) -> None:
        try:
            decoded = decode_server(message)
        except ProtocolError as exc:
            self.trace.error = f"undecodable server frame: {exc}"
            return
        if isinstance(decoded, memoryview):
            self._record_audio(t, OUT_FRAME_SAMPLES)
        elif isinstance(decoded, SessionStart):
            self.trace.session_id = decoded.session_id
            self._record_handshake(t)
        elif isinstance(decoded, Transcript):
            self.trace.text_pieces += 1
        elif isinstance(decoded, Latency):
            self.trace.drop_reports.append((t, decoded.dropped_frames))
            self.trace.skipped_frames = decoded.skipped_frames

    async def goodbye(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(encode_client_control(ClientSessionEnd()))


class ReferenceClient(_SessionClient):
    """moshi.server's protocol: Ogg/Opus at 24 kHz through sphn, one kind byte in front of each message."""

    path = "/api/chat"

    def __init__(self, index: int, pcm24: np.ndarray, page_frames: int = 1) -> None:
        """`page_frames`: send what the writer released once every that many 20 ms frames (4: moshi's
        Python client, one 80 ms page at a time; 2: its web UI); 1: as soon as released (sphn's writer
        releases a page per 40 ms)."""
        super().__init__(index)
        import sphn  # the optional extra `reference`; only this client needs it

        self.pcm24 = pcm24
        self.writer = sphn.OpusStreamWriter(REFERENCE_RATE)
        self.reader = sphn.OpusStreamReader(REFERENCE_RATE)
        self.page_frames = page_frames
        self._unsent = b""

    def payload(self, frame_index: int) -> bytes | None:
        start = frame_index * REFERENCE_FRAME_SAMPLES
        self._unsent += self.writer.append_pcm(self.pcm24[start : start + REFERENCE_FRAME_SAMPLES])
        if (frame_index + 1) % self.page_frames or not self._unsent:
            return None
        message, self._unsent = b"\x01" + self._unsent, b""
        return message

    def handle(self, message: str | bytes, t: float) -> None:
        if isinstance(message, str) or len(message) == 0:
            self.trace.error = f"unexpected message from the reference server: {message[:40]!r}"
            return
        kind, body = message[0], message[1:]
        if kind == 0:
            self._record_handshake(t)
        elif kind == 1:
            samples = self.reader.append_bytes(body).shape[-1]
            if samples:
                self._record_audio(t, samples)
        elif kind == 2:
            self.trace.text_pieces += 1


async def run_sessions(
    clients: list[_SessionClient], base_url: str, n_frames: int, plans: list[StreamPlan]
) -> list[SessionTrace]:
    """Runs every client concurrently on this event loop; returns their traces in order."""
    runs = (client.run(base_url, n_frames, plan) for client, plan in zip(clients, plans, strict=True))
    return list(await asyncio.gather(*runs))
