"""A client of our protocol that streams audio at real-time pace and records everything it gets back.

Used by the tests and the benchmarks: it speaks the wire exactly as the browser page does (`0x01` + 20 ms
of 16 kHz PCM up, `0x02` + 20 ms of 24 kHz PCM and JSON control down), or with `codec="opus"` Opus both
ways (`/ws?codec=opus`: `0x03` + one packet up, `0x04` + one packet down, decoded here to the same PCM).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from procs.network.codec import UP_BITRATE, OpusDecoder, OpusEncoder
from protocol import (
    FRAME_MS,
    FRAMES_PER_BLOCK,
    IN_FRAME_SAMPLES,
    IN_RATE,
    OUT_FRAME_BYTES,
    OUT_RATE,
    ClientSessionEnd,
    ProtocolError,
    SessionEnd,
    SessionStart,
    decode_server,
    decode_server_opus,
    encode_client_audio,
    encode_client_control,
    encode_client_opus,
)

T = TypeVar("T")
FRAME_S = FRAME_MS / 1000
CLOSE_WAIT_S = 10.0  # after the session ends, how long the server has to close it
RESUME_OPEN_S = 1.5  # a resume's handshake taking longer is given up and tried again (web/lib/connection.js)


@dataclass
class ClientRun:
    """What one client sent and saw; times are the event loop's clock (`loop.time()`)."""

    session_start: SessionStart | None = None
    frames: list[tuple[float, bytes]] = field(default_factory=list)  # (receive time, 960 PCM bytes)
    bad_frames: list[tuple[float, bytes]] = field(default_factory=list)
    controls: list[tuple[float, object]] = field(default_factory=list)
    send_times: list[float] = field(default_factory=list)  # right after each audio frame went to the socket
    close_code: int | None = None
    close_reason: str = ""
    # `resume=True`: every `session_start` (the first, then one per resume), when each link dropped, and
    # when each reconnect's `session_start` came.
    session_starts: list[SessionStart] = field(default_factory=list)
    drops: list[float] = field(default_factory=list)
    reconnected: list[float] = field(default_factory=list)
    frames_skipped: int = 0  # audio frames captured while the link was down (a microphone does not wait)
    audio_bytes_up: int = 0  # binary frames as sent (prefix included): what the codec costs on the wire
    audio_bytes_down: int = 0

    @property
    def sent(self) -> int:
        return len(self.send_times)

    @property
    def t_first_send(self) -> float:
        return self.send_times[0] if self.send_times else 0.0

    @property
    def t_last_send(self) -> float:
        return self.send_times[-1] if self.send_times else 0.0

    def of_type(self, cls: type[T]) -> list[T]:
        """The control messages of one type, in the order they arrived."""
        return [m for _, m in self.controls if isinstance(m, cls)]

    def pcm(self) -> np.ndarray:
        return np.frombuffer(b"".join(f for _, f in self.frames), dtype=np.int16)

    def block_latencies_ms(self, warmup_s: float = 0.0) -> list[float]:
        """Send of each 80 ms block's 4th frame -> receipt of its first answer frame, in ms. The server
        answers every block with four frames, in order, so output frame 4k answers input frames 4k..4k+3
        (blocks before `warmup_s` after the first send are left out)."""
        sent, received = self.send_times, [t for t, _ in self.frames]
        return [
            (received[FRAMES_PER_BLOCK * k] - sent[FRAMES_PER_BLOCK * k + 3]) * 1e3
            for k in range(min(len(sent) // FRAMES_PER_BLOCK, (len(received) + 3) // FRAMES_PER_BLOCK))
            if sent[FRAMES_PER_BLOCK * k + 3] - sent[0] >= warmup_s
        ]


async def messages_until_closed(ws: Any) -> list[object]:
    """Every message a connection receives until it closes, decoded (audio as memoryviews)."""
    got: list[object] = []
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            got.append(decode_server(message))
    return got


async def stream_client(
    url: str,
    pcm16: np.ndarray,
    *,
    tail_s: float = 1.0,
    until_frames: int | None = None,
    inject: dict[int, list[str | bytes]] | None = None,
    end_session: bool = True,
    first_audio: asyncio.Event | None = None,
    start_at: float | None = None,
    repeat_until: asyncio.Event | None = None,
    clock_ppm: float = 0.0,
    jitter_s: float = 0.0,
    seed: int | None = None,
    codec: str = "pcm",
    burst: int = 1,
    resume: bool = False,
    retry_s: float = 0.1,
    run: ClientRun | None = None,
    **connect_kwargs: Any,
) -> ClientRun:
    """Stream `pcm16` (16 kHz int16) as 20 ms frames at real-time pace and collect what the server sends.

    Frame i leaves at `start_at` (default: once connected) + i x 20 ms, as a microphone delivers it. After
    the last frame the client listens `tail_s` more (or until `until_frames` output frames came; a negative
    count is relative to the frames it sends, -1: every one of them), then ends
    the session (`end_session`) and waits for the close. `inject` maps a frame index to raw messages sent
    right before that frame. With `repeat_until`, the audio loops until that event is set.

    A real client's clock is not ours: `clock_ppm` makes its 20 ms last 20 ms x (1 + ppm x 1e-6) of ours, and
    `jitter_s` moves each send by up to that much either way (uniformly, seeded by `seed`), as a sound card
    and a network do. `burst` sends the frames in clumps of that many, each clump when its last frame is
    captured, as Wi-Fi, mobile links, TCP coalescing and a client that sends 80 ms pages deliver them.

    `codec="opus"` asks for Opus (`?codec=opus`): the audio is encoded up front (as one pass through an
    encoder, so a looped file restarts mid-stream as a live one would not: fine for tests), and what comes
    back is decoded to 960-byte frames; a packet that does not decode lands in `bad_frames`.

    `resume=True` survives a dropped link as the page does: when the connection dies before the session
    ended, it reconnects (every `retry_s` while the network refuses) with `?resume=` and the newest
    `session_start`'s token, for as long as that token's window lasts, and goes on streaming; the frames due
    meanwhile are skipped (counted), as a microphone's are. Each reconnect's `session_start` joins
    `session_starts` (the first stays `session_start`). `run`: the record to fill (a test watches it live).
    """
    run = ClientRun() if run is None else run
    unclosed = False
    n_frames = len(pcm16) // IN_FRAME_SAMPLES
    if until_frames is not None and until_frames < 0:
        until_frames = n_frames + until_frames + 1
    chunks = [pcm16[i * IN_FRAME_SAMPLES : (i + 1) * IN_FRAME_SAMPLES].tobytes() for i in range(n_frames)]
    decoder: OpusDecoder | None = None
    if codec == "opus":
        encoder = OpusEncoder(IN_RATE, UP_BITRATE)
        frames = [encode_client_opus(encoder.encode(chunk)) for chunk in chunks]
        encoder.close()
        decoder = OpusDecoder(OUT_RATE)
        url += ("&" if "?" in url else "?") + "codec=opus"
    else:
        frames = [encode_client_audio(chunk) for chunk in chunks]
    loop = asyncio.get_running_loop()
    enough_back = asyncio.Event()
    connect_kwargs.setdefault("compression", None)
    connect_kwargs.setdefault("max_size", 2**20)

    async def receive(ws: Any) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                t = loop.time()
                if decoder is not None and not isinstance(message, str):
                    decoded = _opus_frame(decoder, message)
                else:
                    decoded = decode_server(message)
                if not isinstance(message, str):
                    run.audio_bytes_down += len(message)
                if isinstance(decoded, memoryview):
                    if first_audio is not None:
                        first_audio.set()
                    (run.frames if len(decoded) == OUT_FRAME_BYTES else run.bad_frames).append(
                        (t, bytes(decoded))
                    )
                    if until_frames is not None and len(run.frames) >= until_frames:
                        enough_back.set()
                else:
                    run.controls.append((t, decoded))
                    if isinstance(decoded, SessionStart):
                        if run.session_start is None:
                            run.session_start = decoded
                        else:
                            run.reconnected.append(t)
                        run.session_starts.append(decoded)

    async def reconnect(dropped_at: float) -> Any | None:
        """A new connection resuming the session, or None when it cannot be (no token, window over)."""
        start = run.session_starts[-1] if run.session_starts else None
        if start is None or start.resume_token is None:
            return None
        resume_url = url + ("&" if "?" in url else "?") + "resume=" + start.resume_token
        while (left := start.resume_window_s - (loop.time() - dropped_at)) > 0:
            try:  # a handshake into a dead path gives up soon, as the page's does, to try again
                kwargs = {**connect_kwargs, "open_timeout": min(RESUME_OPEN_S, left)}
                return await connect(resume_url, **kwargs)
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                await asyncio.sleep(retry_s)  # the network is still down: try again, as the page does
        return None

    ws = await connect(url, **connect_kwargs)
    receiver = asyncio.create_task(receive(ws))
    try:
        t0 = loop.time() if start_at is None else start_at
        period = FRAME_S * (1.0 + clock_ppm * 1e-6)
        jitter = random.Random(seed)
        i = 0
        while i < n_frames or (repeat_until is not None and not repeat_until.is_set() and n_frames):
            sent_with = i if burst == 1 else (i // burst + 1) * burst - 1  # the clump's last frame
            due = t0 + sent_with * period + (jitter.uniform(-jitter_s, jitter_s) if jitter_s else 0.0)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing, as a microphone delivers frames
            try:
                for raw in (inject or {}).get(i, []):
                    await ws.send(raw)
                await ws.send(frames[i % n_frames])
            except ConnectionClosed:
                if not resume or _session_over(run, ws):
                    raise
                run.drops.append(loop.time())
                await asyncio.wait_for(receiver, timeout=CLOSE_WAIT_S)
                new = await reconnect(run.drops[-1])
                if new is None:
                    raise
                ws = new
                receiver = asyncio.create_task(receive(ws))
                now_i = int((loop.time() - t0) / period)  # frames captured while the link was down
                if now_i > i:
                    run.frames_skipped += now_i - i
                    i = now_i
                continue
            run.send_times.append(loop.time())
            run.audio_bytes_up += len(frames[i % n_frames])
            i += 1
        with contextlib.suppress(TimeoutError):  # frames that never come back fail the caller's checks
            await asyncio.wait_for(enough_back.wait(), timeout=tail_s)
        if end_session:
            await ws.send(encode_client_control(ClientSessionEnd()))
        await asyncio.wait_for(receiver, timeout=CLOSE_WAIT_S)
    except ConnectionClosed:
        pass
    except TimeoutError:  # the server never closed: what was seen is still the run's (no close code)
        unclosed = True
    finally:
        receiver.cancel()
        await ws.close()
    run.close_code, run.close_reason = ws.close_code, ws.close_reason or ""
    if unclosed:
        run.close_code, run.close_reason = None, f"the server did not close within {CLOSE_WAIT_S:.0f} s"
    return run


def _session_over(run: ClientRun, ws: Any) -> bool:
    """The session ended (the server said goodbye or closed it with a close frame), rather than the link."""
    return any(isinstance(m, SessionEnd) for _, m in run.controls) or ws.protocol.close_rcvd is not None


def _opus_frame(decoder: OpusDecoder, message: bytes) -> memoryview:
    """A server Opus frame as its decoded PCM; one that does not decode as its raw bytes (a bad frame)."""
    try:
        return memoryview(decoder.decode(decode_server_opus(message)))
    except ProtocolError:
        return memoryview(bytes(message))

