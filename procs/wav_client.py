"""`voice-agent client`: talk to a server from a terminal or a script, with a WAV file for a microphone.

    voice-agent client --url ws://HOST:8998/ws --wav question.wav --out reply.wav

Reads a WAV (or anything libsndfile reads) at any rate and channel count, resamples it to 16 kHz mono
(libsoxr, through `soxr`),
streams it at real-time pace through the wire protocol exactly as the page does, and writes what the server
says back (24 kHz mono, 16-bit) to `--out`. It prints the time to the first answer frame, the round-trip
latency percentiles of the 80 ms blocks (the 4th frame of a block sent -> its first answer frame received)
and every `error` the server sent; `--json` prints the same as one JSON object instead, for scripts.

Exit status: 0 when the session ran and ended normally (close 1000/1001), 1 when the server refused it,
ended it with an error or never answered, 2 on bad usage (an unreadable WAV, a bad URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import soundfile
import soxr
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.uri import parse_uri

from procs.client import ClientRun, stream_client
from protocol import FRAME_MS, IN_FRAME_SAMPLES, IN_RATE, OUT_RATE, Error, Latency

NORMAL_CLOSES = (1000, 1001)


class WavError(ValueError):
    """A file this client cannot read as PCM audio."""


def read_wav_16k(path: Path) -> np.ndarray:
    """An audio file (WAV of any sample format, including WAVE_FORMAT_EXTENSIBLE and float; FLAC, Ogg;
    whatever libsndfile reads), any rate and channel count, as 16 kHz mono int16."""
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise WavError(f"{path}: not an audio file this client reads ({error}); convert it, e.g. "
                       f"`sox {path} -b 16 out.wav`") from None
    if len(samples) < IN_FRAME_SAMPLES * rate // IN_RATE:
        raise WavError(f"{path}: shorter than one 20 ms frame")
    mono = samples.mean(axis=1)
    if rate != IN_RATE:
        mono = soxr.resample(mono, rate, IN_RATE, quality="HQ")
    return (np.clip(mono, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def write_wav_24k(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(OUT_RATE)
        wav.writeframes(pcm.astype("<i2").tobytes())


@dataclass
class LatencySummary:
    p50: float
    p90: float
    p99: float
    max: float


@dataclass
class ClientReport:
    """What `voice-agent client` prints: the session's outcome and what it measured."""

    url: str
    seconds_sent: float
    frames_sent: int
    frames_received: int
    first_audio_s: float | None  # first audio frame sent -> first answer frame received
    latency_ms: LatencySummary | None  # block round trips, measured here
    server_latency_ms: LatencySummary | None  # the server's own `latency` messages (median, p99)
    errors: list[dict[str, object]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    refused: str | None = None  # the handshake failed: why
    # `--resume`: the session id of each connection (the same one, if every resume worked), and the audio
    # captured while the link was down (not sent: a live microphone does not wait either).
    session_ids: list[str] = field(default_factory=list)
    resumes: int = 0
    frames_skipped: int = 0

    frames_in_file: int = 0  # what there was to send

    @property
    def ok(self) -> bool:
        """Everything was sent and answered, and the session ended normally (a drain's 1001 too, once all
        was sent), with no session-ending error."""
        return (self.refused is None and self.close_code in NORMAL_CLOSES and self.frames_received > 0
                and self.frames_sent + self.frames_skipped >= self.frames_in_file
                and len(set(self.session_ids)) <= 1 and not any(e.get("fatal") for e in self.errors))


def summarize(url: str, run: ClientRun, frames_in_file: int) -> ClientReport:
    round_trips = run.block_latencies_ms()
    server = run.of_type(Latency)
    first = run.frames[0][0] - run.t_first_send if run.frames and run.send_times else None
    return ClientReport(
        url=url,
        seconds_sent=round(run.sent * FRAME_MS / 1000, 2),
        frames_sent=run.sent,
        frames_received=len(run.frames),
        first_audio_s=None if first is None else round(first, 3),
        latency_ms=_percentiles(round_trips),
        server_latency_ms=_percentiles([m.ms for m in server], worst=[m.p99_ms for m in server]),
        errors=[msgspec.to_builtins(e) for e in run.of_type(Error)],
        close_code=run.close_code,
        close_reason=run.close_reason,
        session_ids=[s.session_id for s in run.session_starts],
        resumes=sum(s.resumed for s in run.session_starts),
        frames_skipped=run.frames_skipped,
        frames_in_file=frames_in_file,
    )


def _percentiles(values: list[float], worst: list[float] | None = None) -> LatencySummary | None:
    if not values:
        return None
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    if worst:  # the server's own p99 of each second: the worst one bounds the whole session's
        p99 = max(p99, *worst)
    return LatencySummary(p50=round(p50, 1), p90=round(p90, 1), p99=round(p99, 1),
                          max=round(float(max(values + (worst or []))), 1))


def render(report: ClientReport) -> str:
    if report.refused is not None:
        return f"refused: {report.refused}"
    lines = [f"sent {report.seconds_sent:.2f} s ({report.frames_sent} frames), "
             f"received {report.frames_received * FRAME_MS / 1000:.2f} s ({report.frames_received} frames)"]
    lines.append("first audio: " + ("none" if report.first_audio_s is None
                                    else f"{report.first_audio_s * 1e3:.0f} ms after the first frame"))
    if report.latency_ms is not None:
        lat = report.latency_ms
        lines.append(f"round trip per 80 ms block: p50 {lat.p50} ms, p90 {lat.p90} ms, p99 {lat.p99} ms, "
                     f"max {lat.max} ms")
    if report.server_latency_ms is not None:
        lat = report.server_latency_ms
        lines.append(f"server processing (its `latency` messages): p50 {lat.p50} ms, p99 {lat.p99} ms")
    lines += [f"error: {e.get('code')}: {e.get('msg')}" for e in report.errors]
    if report.resumes or len(set(report.session_ids)) > 1:
        sessions = ", ".join(dict.fromkeys(report.session_ids))
        lines.append(f"resumed {report.resumes} times after a dropped link (sessions: {sessions}; "
                     f"{report.frames_skipped} frames not sent while it was down)")
    lines.append(f"closed: {report.close_code} {report.close_reason}".rstrip())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice-agent client", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the server's WebSocket URL, ws://HOST:PORT/ws or "
                        "wss://...; add ?token=... when the server asks for one")
    parser.add_argument("--wav", required=True, type=Path, help="what to say: a PCM WAV file, any rate")
    parser.add_argument("--out", type=Path, default=None, help="write the answer here (24 kHz mono WAV)")
    parser.add_argument("--tail", type=float, default=2.0, metavar="S",
                        help="listen this long after the last frame (default 2 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--ca-file", type=Path, default=None,
                        help="trust this CA (PEM) for wss:// (e.g. a self-signed certificate)")
    parser.add_argument("--insecure", action="store_true", help="wss:// without checking the certificate")
    parser.add_argument("--resume", action="store_true",
                        help="if the link drops before the session ends, reconnect and resume the same "
                        "session (within the server's --resume-window), as the page does")
    return parser


def tls_context(url: str, ca_file: Path | None, insecure: bool) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def talk(url: str, pcm: np.ndarray, tail_s: float, context: ssl.SSLContext | None,
               resume: bool = False) -> tuple[ClientReport, np.ndarray]:
    """The report, and the answer's 24 kHz PCM (empty if the server refused the session)."""
    kwargs = {} if context is None else {"ssl": context}
    try:
        run = await stream_client(url, pcm, tail_s=tail_s, resume=resume, **kwargs)
    except (InvalidHandshake, OSError, TimeoutError) as error:  # refused (HTTP 4xx/5xx), unreachable, TLS
        refused = ClientReport(url=url, seconds_sent=0.0, frames_sent=0, frames_received=0,
                               first_audio_s=None, latency_ms=None, server_latency_ms=None,
                               refused=str(error) or type(error).__name__)
        return refused, np.zeros(0, np.int16)
    return summarize(url, run, len(pcm) // IN_FRAME_SAMPLES), run.pcm()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # every mistake in the command line is found before the session, not after it
        pcm = read_wav_16k(args.wav)
        parse_uri(args.url)
        context = tls_context(args.url, args.ca_file, args.insecure)
    except (WavError, InvalidURI, ValueError, OSError, ssl.SSLError) as error:
        parser.error(str(error))
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out: no such directory: {args.out.parent}")
    report, answer = asyncio.run(talk(args.url, pcm, args.tail, context, args.resume))
    if args.out is not None and report.refused is None:
        write_wav_24k(args.out, answer)
    if args.json:
        print(json.dumps(asdict(report) | {"ok": report.ok}, ensure_ascii=False))
    else:
        print(render(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
