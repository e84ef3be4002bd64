"""What Opus on `/ws` costs and gives, against PCM measured in the same run (issue 12).

    python -m bench.opus_cost [--sessions 8] [--seconds 20]

1. per hop, sans I/O: µs to decode one client packet (16 kHz) and to encode one model frame (24 kHz) in
   `procs/network/codec.py`, over 30 s of Telugu speech; and the delay the codec adds (the lag that best
   aligns decoded with original audio);
2. end to end, a real server with the loopback engine: `--sessions` clients stream Telugu speech at
   real-time pace, all PCM, then all Opus; the network process's CPU seconds (from /proc) per session-second,
   the audio bytes each way (prefix included) as bits per second, and the quality of what came back: SNR
   of the returned audio against the sent audio band-limited and resampled to 24 kHz, after the best lag.

Prints one Markdown table; `machine_busy_s` shows how busy the other core was (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from procs.client import ClientRun, stream_client
from procs.network.codec import UP_BITRATE, OpusDecoder, OpusEncoder, SessionCodec
from protocol import IN_RATE, OUT_RATE
from tests.support.launcher import ServerProcess, cpu_seconds, machine_busy_s
from tests.support.speech import repeat_to, telugu_speech_16k


def reference_24k(pcm16: np.ndarray) -> np.ndarray:
    """What a perfect loopback returns: the 16 kHz input resampled to 24 kHz in the frequency domain."""
    x = pcm16.astype(np.float64)
    return np.fft.irfft(np.fft.rfft(x), n=len(x) * 3 // 2) * 1.5


def aligned_snr_db(ref: np.ndarray, got: np.ndarray, max_lag: int = 1200) -> tuple[float, int]:
    """(SNR in dB of `got` against `ref` at the lag that correlates best, that lag in samples). The gain is
    fitted too (least squares), so only distortion and noise count, not level."""
    got = got.astype(np.float64)
    n = min(len(ref), len(got)) - max_lag
    best = max(range(max_lag), key=lambda lag: float(np.dot(ref[:n], got[lag : lag + n])))
    r, g = ref[:n], got[best : best + n]
    gain = float(np.dot(r, g) / np.dot(r, r))
    noise = g - gain * r
    return 10 * np.log10(np.sum((gain * r) ** 2) / max(np.sum(noise**2), 1e-9)), best


def per_hop(pcm16: np.ndarray) -> dict[str, float]:
    frames_in = [pcm16[i : i + 320].tobytes() for i in range(0, len(pcm16) - 319, 320)]
    up = OpusEncoder(IN_RATE, UP_BITRATE)  # the page's side of the uplink (WebCodecs there)
    packets = [up.encode(f) for f in frames_in]
    codec = SessionCodec()
    t0 = time.process_time()
    decoded = [codec.decode(memoryview(p)) for p in packets]
    decode_us = (time.process_time() - t0) / len(packets) * 1e6
    ref = reference_24k(pcm16)
    frames_out = [ref[i : i + 480].clip(-32768, 32767).astype(np.int16).tobytes()
                  for i in range(0, len(ref) - 479, 480)]
    t0 = time.process_time()
    down = [codec.encode(f) for f in frames_out]
    encode_us = (time.process_time() - t0) / len(frames_out) * 1e6
    back = OpusDecoder(OUT_RATE)
    heard = np.frombuffer(b"".join(back.decode(p) for p in down), np.int16)
    up_pcm = np.frombuffer(b"".join(bytes(d) for d in decoded), np.int16)
    snr_up, lag_up = aligned_snr_db(pcm16.astype(np.float64), up_pcm)
    snr_down, lag_down = aligned_snr_db(ref, heard)
    return {"decode_us": decode_us, "encode_us": encode_us, "lag_up_ms": lag_up / 16,
            "lag_down_ms": lag_down / 24, "snr_up_db": snr_up, "snr_down_db": snr_down}


async def sessions(url: str, pcm16: np.ndarray, n: int, codec: str) -> list[ClientRun]:
    return list(await asyncio.gather(*(stream_client(url, pcm16, tail_s=3.0, until_frames=len(pcm16) // 320,
                                                     codec=codec) for _ in range(n))))


def end_to_end(pcm16: np.ndarray, n: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    ref = reference_24k(pcm16)
    with ServerProcess("--engine", "loopback", "--max-sessions", str(n)) as server:
        network = server.child_pid("network")
        asyncio.run(sessions(server.ws_url, pcm16[: IN_RATE], 1, "opus"))  # warm-up: imports, first session
        for codec in ("pcm", "opus"):
            cpu0, busy0, t0 = cpu_seconds(network), machine_busy_s(), time.monotonic()
            runs = asyncio.run(sessions(server.ws_url, pcm16, n, codec))
            wall = time.monotonic() - t0
            cpu = cpu_seconds(network) - cpu0
            session_s = sum(r.sent for r in runs) * 0.02
            snrs = [aligned_snr_db(ref, r.pcm())[0] for r in runs]
            out[codec] = {
                "cpu_ms_per_session_s": cpu / session_s * 1e3,
                "up_kbps": sum(r.audio_bytes_up for r in runs) * 8 / session_s / 1e3,
                "down_kbps": sum(r.audio_bytes_down for r in runs) * 8
                / (sum(len(r.frames) for r in runs) * 0.02) / 1e3,
                "snr_db": float(np.median(snrs)),
                "snr_min_db": float(min(snrs)),
                "frames_back_pct": 100 * sum(len(r.frames) for r in runs) / max(1, sum(r.sent for r in runs)),
                "other_busy_cores": (machine_busy_s() - busy0 - cpu) / wall,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    speech = telugu_speech_16k()
    hop = per_hop(repeat_to(speech, 30.0))
    pcm = repeat_to(speech, args.seconds)
    pcm = pcm[: len(pcm) // 1280 * 1280]
    e2e = end_to_end(pcm, args.sessions)
    p, o = e2e["pcm"], e2e["opus"]
    print(f"| per hop (sans I/O, 30 s of speech) | decode a client packet: {hop['decode_us']:.0f} µs/frame "
          f"| encode a model frame: {hop['encode_us']:.0f} µs/frame |")
    print(f"| codec delay (best-aligned lag) | up {hop['lag_up_ms']:.1f} ms "
          f"| down {hop['lag_down_ms']:.1f} ms |")
    print(f"| one Opus pass, SNR | up (16 kHz, {UP_BITRATE // 1000} kbit/s) {hop['snr_up_db']:.1f} dB "
          f"| down (24 kHz) {hop['snr_down_db']:.1f} dB |")
    print(f"\n{args.sessions} sessions x {args.seconds:g} s, loopback engine:\n")
    print("| | PCM | Opus |\n| --- | --- | --- |")
    for key, label in (("cpu_ms_per_session_s", "network process CPU, ms per session-second"),
                       ("up_kbps", "up, kbit/s (prefix included)"), ("down_kbps", "down, kbit/s"),
                       ("snr_db", "round trip SNR, dB (median)"),
                       ("snr_min_db", "round trip SNR, dB (worst)"),
                       ("frames_back_pct", "frames back, % of sent"),
                       ("other_busy_cores", "other load on the machine, cores")):
        print(f"| {label} | {p[key]:.2f} | {o[key]:.2f} |")


if __name__ == "__main__":
    main()
