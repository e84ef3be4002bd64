"""Cost of the per-frame protocol work on the server's hot path.

Run: pytest bench/test_bench_protocol.py -s
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Submodules, not the package: imported from outside the repository root, `protocol` may resolve
# to the editable install's namespace stand-in, which has no attributes of its own.
from protocol.constants import IN_FRAME_BYTES, OUT_FRAME_SAMPLES
from protocol.messages import Latency, LatencyBreakdown, Ping
from protocol.wire import (
    decode_client,
    decode_client_audio,
    decode_client_control,
    encode_client_audio,
    encode_client_control,
    encode_server_audio,
    encode_server_control,
)


def test_decode_client_audio(benchmark: Any) -> None:
    frame = encode_client_audio(np.random.default_rng(0).bytes(IN_FRAME_BYTES))
    pcm = benchmark(decode_client_audio, frame)
    assert pcm.nbytes == IN_FRAME_BYTES


def test_decode_client_dispatch_audio(benchmark: Any) -> None:
    frame = encode_client_audio(bytes(IN_FRAME_BYTES))
    assert benchmark(decode_client, frame).nbytes == IN_FRAME_BYTES


def test_decode_client_control_ping(benchmark: Any) -> None:
    text = encode_client_control(Ping(id=123456, t_ms=98765.4321))
    assert benchmark(decode_client_control, text) == Ping(id=123456, t_ms=98765.4321)


def test_encode_server_audio(benchmark: Any) -> None:
    pcm = (np.sin(np.arange(OUT_FRAME_SAMPLES) / 7.0) * 20000).astype(np.int16)
    assert len(benchmark(encode_server_audio, pcm)) == 1 + 2 * OUT_FRAME_SAMPLES


def test_encode_server_audio_bytes(benchmark: Any) -> None:
    pcm = bytes(2 * OUT_FRAME_SAMPLES)
    assert len(benchmark(encode_server_audio, pcm)) == 1 + 2 * OUT_FRAME_SAMPLES


def test_encode_server_control_latency(benchmark: Any) -> None:
    msg = Latency(
        ms=183.25,
        breakdown=LatencyBreakdown(queue_ms=3.5, step_ms=160.0, resample_ms=0.05, transport_ms=0.4),
        p99_ms=240.75,
        dropped_frames=2,
        window_s=5.0,
    )
    assert benchmark(encode_server_control, msg).startswith('{"type":"latency"')
