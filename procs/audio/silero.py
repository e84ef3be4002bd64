"""Streaming Silero VAD for many sessions at once, one batched ONNX call per 32 ms window round.

Silero v5/v6 consumes windows of exactly 512 samples at 16 kHz, each preceded by the last 64 samples of
the previous window (its "context"), and carries an LSTM state of shape [2, batch, 128]. The ONNX graph
takes that state as an explicit input, so one call serves many sessions: row i of the batch is slot i's
window, context and state. This reproduces the package's own `OnnxWrapper.__call__` row by row, so the
probabilities are the package's (see tests/test_silero.py).

Start/end decisions follow `silero_vad.VADIterator` and `get_speech_timestamps` (threshold, neg_threshold,
min_silence_duration_ms, speech_pad_ms). Times are in each session's own audio clock: samples pushed since
`reset(slot)`, divided by 16.

This module needs only numpy and onnxruntime (no torch), so the VAD process starts fast and stays small;
`offline_speech_segments` imports the silero_vad package (and torch) lazily, for tests and checks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 512  # Silero v5/v6 at 16 kHz: exactly 512 samples (32 ms) per call
CONTEXT_SAMPLES = 64  # prepended to every window, taken from the end of the previous one
STATE_SHAPE_HEAD = 2  # state is [2, batch, 128]
STATE_WIDTH = 128
SAMPLES_PER_MS = SAMPLE_RATE // 1000
_INITIAL_BUFFER_SAMPLES = 8 * WINDOW_SAMPLES


def silero_onnx_path() -> Path:
    """The ONNX weights shipped in the silero-vad wheel (the file `load_silero_vad(onnx=True)` uses).

    Found without importing `silero_vad`, whose __init__ imports torch and sets torch's thread count.
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"silero-vad ONNX weights not found at {path}")
    return path


def default_neg_threshold(threshold: float) -> float:
    """Silero's exit threshold when none is given (as in `get_speech_timestamps`)."""
    return max(threshold - 0.15, 0.01)


def pcm16_to_float(pcm16: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1), the scale Silero was trained on."""
    return np.asarray(pcm16, dtype=np.float32) / 32768.0


@dataclass(frozen=True, slots=True)
class SpeechEdge:
    slot: int
    event: Literal["start", "end"]
    t_ms: float  # in the session's own audio clock (samples since reset / 16), padding applied


@dataclass(slots=True)
class _SlotDecision:
    """Per-session speech/silence hysteresis, exactly as in VADIterator / get_speech_timestamps."""

    triggered: bool = False
    silence_since: int | None = None  # sample where the current run of sub-neg_threshold windows began
    windows_done: int = 0  # windows of this session already scored
    last_prob: float = 0.0


class StreamingVad:
    """Silero VAD over `n_slots` independent sessions, sharing one ONNX session and one call per round.

    Not thread-safe: one owner calls push/process/reset (the VAD process's loop).
    """

    def __init__(
        self,
        n_slots: int,
        *,
        threshold: float = 0.5,
        neg_threshold: float | None = None,
        min_silence_ms: float = 100,
        speech_pad_ms: float = 30,
        model_path: str | Path | None = None,
    ) -> None:
        if n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        self.n_slots = n_slots
        self.threshold = float(threshold)
        self.neg_threshold = float(
            default_neg_threshold(threshold) if neg_threshold is None else neg_threshold
        )
        self.min_silence_ms = float(min_silence_ms)
        self.speech_pad_ms = float(speech_pad_ms)
        self._min_silence_samples = min_silence_ms * SAMPLES_PER_MS
        self._speech_pad_samples = speech_pad_ms * SAMPLES_PER_MS

        options = onnxruntime.SessionOptions()
        # One thread: the model is tiny (~0.1 ms per window) and the 2 cores belong to network and Moshi.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        self._session = onnxruntime.InferenceSession(
            str(model_path or silero_onnx_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sample_rate_input = np.array(SAMPLE_RATE, dtype=np.int64)

        # Batched model memory, one row per slot; a round gathers the ready rows and scatters them back.
        self._state = np.zeros((STATE_SHAPE_HEAD, n_slots, STATE_WIDTH), dtype=np.float32)
        self._context = np.zeros((n_slots, CONTEXT_SAMPLES), dtype=np.float32)
        # Per-slot re-chunking buffer of float samples: valid data is [_read, _write).
        self._buffer = np.zeros((n_slots, _INITIAL_BUFFER_SAMPLES), dtype=np.float32)
        self._read = np.zeros(n_slots, dtype=np.int64)
        self._write = np.zeros(n_slots, dtype=np.int64)
        self._decisions = [_SlotDecision() for _ in range(n_slots)]

    # ---- session lifecycle -------------------------------------------------------------------------

    def reset(self, slot: int) -> None:
        """New session in `slot`: zero its model state and context, drop buffered audio, restart its clock."""
        self._check_slot(slot)
        self._state[:, slot] = 0.0
        self._context[slot] = 0.0
        self._read[slot] = 0
        self._write[slot] = 0
        self._decisions[slot] = _SlotDecision()

    def push(self, slot: int, pcm16: np.ndarray) -> None:
        """Queue int16 audio (any length, usually one 320-sample frame) for `slot`."""
        self._check_slot(slot)
        samples = np.asarray(pcm16)
        if samples.dtype != np.int16:
            raise TypeError(f"expected int16 PCM, got {samples.dtype}")
        samples = samples.reshape(-1)
        count = samples.shape[0]
        if count == 0:
            return
        self._make_room(slot, count)
        write = int(self._write[slot])
        np.multiply(samples, np.float32(1.0 / 32768.0), out=self._buffer[slot, write : write + count])
        self._write[slot] = write + count

    # ---- inference ---------------------------------------------------------------------------------

    def process(self) -> list[SpeechEdge]:
        """Score every full 512-sample window queued, one batched call per round; return the events.

        Each round takes one window from every slot that has one, so a slot that fell behind catches up
        over several rounds while the others are not delayed. Events come in audio order per slot.
        """
        events: list[SpeechEdge] = []
        while True:
            ready = np.flatnonzero(self._write - self._read >= WINDOW_SAMPLES)
            if ready.size == 0:
                return events
            probs = self._score_round(ready)
            for slot, prob in zip(ready.tolist(), probs.tolist(), strict=True):
                event = self._decide(slot, prob)
                if event is not None:
                    events.append(event)

    def in_speech(self, slot: int) -> bool:
        """Whether `slot` is between a start and an end event."""
        self._check_slot(slot)
        return self._decisions[slot].triggered

    def last_prob(self, slot: int) -> float:
        """Speech probability of the slot's most recently scored window (0.0 before any)."""
        self._check_slot(slot)
        return self._decisions[slot].last_prob

    def scored_ms(self, slot: int) -> float:
        """How much of the slot's audio has been scored (whole windows), in its own clock."""
        self._check_slot(slot)
        return self._decisions[slot].windows_done * WINDOW_SAMPLES / SAMPLES_PER_MS

    def pending_samples(self, slot: int) -> int:
        """Samples pushed to `slot` and not yet scored (always < 512 right after process())."""
        self._check_slot(slot)
        return int(self._write[slot] - self._read[slot])

    # ---- internals ---------------------------------------------------------------------------------

    def _score_round(self, ready: np.ndarray) -> np.ndarray:
        """One model call for the ready slots; advances their buffers, contexts and states."""
        batch = np.empty((ready.size, CONTEXT_SAMPLES + WINDOW_SAMPLES), dtype=np.float32)
        batch[:, :CONTEXT_SAMPLES] = self._context[ready]
        for row, slot in enumerate(ready.tolist()):
            read = int(self._read[slot])
            batch[row, CONTEXT_SAMPLES:] = self._buffer[slot, read : read + WINDOW_SAMPLES]
            self._read[slot] = read + WINDOW_SAMPLES
        probs, new_state = self._session.run(
            None,
            {
                "input": batch,
                "state": np.ascontiguousarray(self._state[:, ready]),
                "sr": self._sample_rate_input,
            },
        )
        self._state[:, ready] = new_state
        self._context[ready] = batch[:, -CONTEXT_SAMPLES:]
        return probs[:, 0]

    def _decide(self, slot: int, prob: float) -> SpeechEdge | None:
        """Hysteresis of VADIterator / get_speech_timestamps for the window that just scored `prob`.

        `window_start` is the window's first sample, which is what get_speech_timestamps calls
        cur_sample (VADIterator counts the window's end and subtracts the window size: the same).
        """
        decision = self._decisions[slot]
        window_start = decision.windows_done * WINDOW_SAMPLES
        decision.windows_done += 1
        decision.last_prob = prob

        if prob >= self.threshold:
            decision.silence_since = None
            if not decision.triggered:
                decision.triggered = True
                start = max(0.0, window_start - self._speech_pad_samples)
                return SpeechEdge(slot, "start", start / SAMPLES_PER_MS)
            return None

        if prob < self.neg_threshold and decision.triggered:
            if decision.silence_since is None:
                decision.silence_since = window_start
            if window_start - decision.silence_since >= self._min_silence_samples:
                end = decision.silence_since + self._speech_pad_samples
                decision.triggered = False
                decision.silence_since = None
                return SpeechEdge(slot, "end", end / SAMPLES_PER_MS)
        return None

    def _make_room(self, slot: int, count: int) -> None:
        """Ensure `count` free samples after the slot's write index: compact first, grow if needed."""
        read, write = int(self._read[slot]), int(self._write[slot])
        capacity = self._buffer.shape[1]
        if write + count <= capacity:
            return
        pending = write - read
        if read > 0:
            # Overlapping copy is safe: numpy buffers overlapping slice assignment.
            self._buffer[slot, :pending] = self._buffer[slot, read:write]
            self._read[slot] = 0
            self._write[slot] = pending
        if pending + count > capacity:
            # Someone pushed a long stretch without processing (tests, catch-up): grow all rows.
            new_capacity = max(2 * capacity, pending + count)
            grown = np.zeros((self.n_slots, new_capacity), dtype=np.float32)
            grown[:, :capacity] = self._buffer
            self._buffer = grown

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"slot {slot} out of range 0..{self.n_slots - 1}")


def offline_speech_segments(
    pcm16: np.ndarray,
    *,
    threshold: float = 0.5,
    neg_threshold: float | None = None,
    min_silence_ms: float = 100,
    speech_pad_ms: float = 30,
    min_speech_ms: float = 0,
    onnx: bool = True,
) -> list[tuple[float, float]]:
    """Silero's own offline segmentation of a whole recording, as (start_ms, end_ms) pairs.

    Runs `silero_vad.get_speech_timestamps` with the parameters StreamingVad uses. `min_speech_ms`
    defaults to 0 because a streaming start event cannot know how long the speech will last; the package's
    own default (250) drops shorter segments. `onnx=True` loads the same ONNX weights as StreamingVad;
    `onnx=False` the package's default TorchScript model (probabilities differ by ~1e-5).
    """
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    model = load_silero_vad(onnx=onnx)
    audio = torch.from_numpy(pcm16_to_float(np.asarray(pcm16).reshape(-1)))
    segments = get_speech_timestamps(
        audio,
        model,
        threshold=threshold,
        neg_threshold=default_neg_threshold(threshold) if neg_threshold is None else neg_threshold,
        sampling_rate=SAMPLE_RATE,
        min_silence_duration_ms=min_silence_ms,
        speech_pad_ms=speech_pad_ms,
        min_speech_duration_ms=min_speech_ms,
    )
    return [(seg["start"] / SAMPLES_PER_MS, seg["end"] / SAMPLES_PER_MS) for seg in segments]
