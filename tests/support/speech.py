"""Telugu test speech, synthesised with espeak-ng and resampled with sox to the wire format (for the tests
and the benchmarks; not installed with the server).

Shared by many tests: every function returns a fresh int16 array (16 kHz mono), so callers may modify it.
Synthesis takes ~0.1-0.3 s per sentence, so results are cached on disk by a hash of everything that
determines them; cache files are written atomically, so parallel test processes can share the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
ESPEAK_VOICE = "te"

DEFAULT_UTTERANCES: tuple[str, ...] = (
    "నమస్కారం, మీరు ఎలా ఉన్నారు?",
    "ఈ రోజు వాతావరణం చాలా బాగుంది.",
    "నాకు తెలుగు సినిమాలు అంటే చాలా ఇష్టం.",
    "దయచేసి నాకు ఒక కప్పు కాఫీ ఇవ్వండి.",
)
DEFAULT_TEXT = " ".join(DEFAULT_UTTERANCES)

# Bump when the synthesis pipeline changes, so stale cache entries are not reused.
_PIPELINE_VERSION = "espeak-ng|sox-D-r16000-b16-c1|v1"
_CACHE_DIR_ENV = "TELUGU_SPEECH_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$TELUGU_SPEECH_CACHE_DIR` if set, else a fixed folder under the system temp dir."""
    configured = os.environ.get(_CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / "telugu_voice_agent_speech_cache"


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    """Write mono int16 PCM as a 16-bit WAV file."""
    samples = np.asarray(pcm)
    if samples.dtype != np.int16:
        raise TypeError(f"expected int16 PCM, got {samples.dtype}")
    if samples.ndim != 1:
        raise ValueError(f"expected mono (1-D) PCM, got shape {samples.shape}")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype("<i2", copy=False).tobytes())


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a mono 16-bit WAV file; returns (int16 samples, sample rate)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(
                f"{path}: expected mono 16-bit, got {wav.getnchannels()} ch x {8 * wav.getsampwidth()} bit"
            )
        rate = wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.int16), rate


def _require_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is needed to synthesise Telugu test speech (apt-get install {name})")
    return found


def _synthesise(text: str, out_path: Path) -> None:
    """espeak-ng -v te -> WAV at espeak's native rate (22.05 kHz), then sox -> 16 kHz mono 16-bit.

    sox gets -D (no dither): its default dither is random per run, and tests want the same samples
    whenever the cache is rebuilt.
    """
    espeak = _require_tool("espeak-ng")
    sox = _require_tool("sox")
    with tempfile.TemporaryDirectory(dir=out_path.parent) as work:
        native = Path(work) / "native.wav"
        resampled = Path(work) / "out16.wav"
        # Text goes in on stdin so that text starting with '-' is never read as an option.
        subprocess.run(
            [espeak, "-v", ESPEAK_VOICE, "-w", str(native), "--stdin"],
            input=text.encode("utf-8"),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [sox, str(native), "-D", "-r", str(SAMPLE_RATE), "-b", "16", "-c", "1", str(resampled)],
            check=True,
            capture_output=True,
        )
        # Atomic publish: a concurrent reader sees either no file or a complete one.
        os.replace(resampled, out_path)


def telugu_speech_16k(text: str = DEFAULT_TEXT, *, cache_dir: Path | None = None) -> np.ndarray:
    """Telugu speech for `text` as int16 16 kHz mono (espeak-ng voice 'te', resampled by sox)."""
    if not text.strip():
        raise ValueError("text must not be empty")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{_PIPELINE_VERSION}|{ESPEAK_VOICE}|{text}".encode()).hexdigest()[:24]
    cached = folder / f"te_{key}.wav"
    if not cached.exists():
        _synthesise(text, cached)
    pcm, rate = read_wav(cached)
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"{cached}: expected {SAMPLE_RATE} Hz, got {rate}")
    return pcm


def conversation_16k_with_spans(
    utterances: Sequence[str] = DEFAULT_UTTERANCES,
    *,
    lead_silence_s: float = 1.0,
    gap_s: float | Sequence[float] = (1.0, 1.5, 1.2),
    tail_silence_s: float = 1.0,
    cache_dir: Path | None = None,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Utterances separated by digital silence, plus where each utterance's audio was placed.

    `gap_s` is one gap for all, or a sequence cycled over the gaps. The spans are (start_ms, end_ms) of
    each synthesised clip, which includes espeak-ng's own short quiet edges: they bound the speech, they
    are not exact speech onsets.
    """
    if not utterances:
        raise ValueError("need at least one utterance")
    gaps = [gap_s] if isinstance(gap_s, int | float) else list(gap_s)
    if not gaps or min(gaps) < 0 or lead_silence_s < 0 or tail_silence_s < 0:
        raise ValueError("silences must be non-negative")

    def zeros(seconds: float) -> np.ndarray:
        return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.int16)

    pieces = [zeros(lead_silence_s)]
    spans: list[tuple[float, float]] = []
    cursor = len(pieces[0])
    for index, text in enumerate(utterances):
        if index > 0:
            gap = zeros(gaps[(index - 1) % len(gaps)])
            pieces.append(gap)
            cursor += len(gap)
        clip = telugu_speech_16k(text, cache_dir=cache_dir)
        pieces.append(clip)
        spans.append((cursor * 1000 / SAMPLE_RATE, (cursor + len(clip)) * 1000 / SAMPLE_RATE))
        cursor += len(clip)
    pieces.append(zeros(tail_silence_s))
    return np.concatenate(pieces), spans


def conversation_16k(
    utterances: Sequence[str] = DEFAULT_UTTERANCES,
    *,
    lead_silence_s: float = 1.0,
    gap_s: float | Sequence[float] = (1.0, 1.5, 1.2),
    tail_silence_s: float = 1.0,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Several Telugu utterances separated by silences (int16, 16 kHz mono): clear VAD start/end events."""
    pcm, _ = conversation_16k_with_spans(
        utterances,
        lead_silence_s=lead_silence_s,
        gap_s=gap_s,
        tail_silence_s=tail_silence_s,
        cache_dir=cache_dir,
    )
    return pcm


def repeat_to(pcm16: np.ndarray, seconds: float) -> np.ndarray:
    """16 kHz audio repeated to `seconds`, cut to whole 80 ms blocks (1280 samples)."""
    reps = int(np.ceil(seconds * 16000 / len(pcm16)))
    return np.tile(pcm16, reps)[: int(seconds * 16000) // 1280 * 1280]


def whole_blocks(pcm16: np.ndarray) -> np.ndarray:
    """16 kHz audio cut to whole 80 ms blocks (1280 samples), what the model steps on."""
    return pcm16[: len(pcm16) // 1280 * 1280]


def telugu_speech_for(seconds: float) -> np.ndarray:
    """The default Telugu utterances repeated to `seconds`, in whole 80 ms blocks (int16, 16 kHz mono)."""
    return repeat_to(telugu_speech_16k(), seconds)
