"""Streaming 16 kHz -> 24 kHz resampling for the wire audio (pure numpy), and PCM conversions.

Rational resampling by 3/2 with a polyphase FIR: conceptually the input is zero-stuffed to 48 kHz
(up 3), low-pass filtered, and every second sample is kept (down 2). Only the products that touch
real input samples are computed: each output sample is a 39-tap dot product with one of the three
polyphase branches of the 117-tap prototype filter.

The prototype is a Kaiser-windowed sinc (beta 7, -6 dB at 7.9 kHz): passband flat within 0.01 dB
up to 7 kHz, stop band >= 70 dB from 9 kHz, which is where the first image of a 7 kHz tone lands and
above which everything would fold back when keeping every second 48 kHz sample. Its group delay
is exactly 29 output samples (1.21 ms), so output sample n lines up with input time (n - 29) / 24 kHz.

State per stream is the last 38 input samples. Chunks must have an even length, so every chunk
ends on a whole 2-in/3-out cycle and the polyphase phase is 0 at every chunk boundary: feeding a
signal in 20 ms frames (320 -> 480) gives the same output as feeding it at once, with no seams.
"""

from collections.abc import Sequence
from typing import Final

import numpy as np

UP: Final = 3
DOWN: Final = 2
IN_RATE: Final = 16_000
OUT_RATE: Final = IN_RATE * UP // DOWN

_PROTOTYPE_TAPS: Final = 117  # (taps - 1) / 4 is whole, so the delay is a whole output sample
_CUTOFF_HZ: Final = 7_900.0
_KAISER_BETA: Final = 7.0
_BRANCH_TAPS: Final = _PROTOTYPE_TAPS // UP  # 39 taps per polyphase branch
_HISTORY: Final = _BRANCH_TAPS - 1  # input samples carried from one chunk to the next
_WINDOW: Final = _BRANCH_TAPS + 1  # input samples one 2-in/3-out cycle reads
LATENCY_SAMPLES: Final = (_PROTOTYPE_TAPS - 1) // 4  # group delay: (taps-1)/2 at 48 kHz, halved

_INT16_SCALE: Final = 32768.0

Rows = int | Sequence[int] | np.ndarray


def prototype_filter() -> np.ndarray:
    """The 117-tap low-pass prototype at 48 kHz (float64), with a gain of 3 to undo zero-stuffing.

    Each of the three polyphase branches is normalised to a DC gain of exactly 1, so a constant
    input gives a constant output (no residual image of DC at 16 kHz).
    """
    up_rate = IN_RATE * UP
    n = np.arange(_PROTOTYPE_TAPS) - (_PROTOTYPE_TAPS - 1) / 2
    taps = (
        2
        * _CUTOFF_HZ
        / up_rate
        * np.sinc(2 * _CUTOFF_HZ / up_rate * n)
        * np.kaiser(_PROTOTYPE_TAPS, _KAISER_BETA)
    )
    for phase in range(UP):
        taps[phase::UP] /= taps[phase::UP].sum()
    return taps


def _cycle_matrix(taps: np.ndarray) -> np.ndarray:
    """[40, 3] float32: column r maps a 40-sample input window to output r of a 2-in/3-out cycle.

    For output n of the stream, the 48 kHz position is 2n; its branch is (2n mod 3) and its newest
    input sample is floor(2n/3). Within cycle g (outputs 3g, 3g+1, 3g+2; inputs 2g, 2g+1) that is
    branch 0 ending at input 2g, branch 2 ending at 2g, and branch 1 ending at 2g+1. The window
    starts 38 samples before input 2g, so a branch ending at 2g+e has its tap i at window index
    38 + e - i.
    """
    matrix = np.zeros((_WINDOW, UP), dtype=np.float64)
    for column, (branch, newest) in enumerate(((0, 0), (2, 0), (1, 1))):
        for i in range(_BRANCH_TAPS):
            matrix[_HISTORY + newest - i, column] = taps[branch + UP * i]
    return matrix.astype(np.float32)


def int16_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM -> float32 in [-1, 1)."""
    out = np.asarray(pcm, dtype=np.int16).astype(np.float32)
    out *= 1.0 / _INT16_SCALE
    return out


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """float PCM in [-1, 1] -> int16, rounded to nearest and clipped (overshoot saturates, no wrap)."""
    scaled = np.asarray(samples, dtype=np.float32) * _INT16_SCALE
    np.rint(scaled, out=scaled)
    np.clip(scaled, -_INT16_SCALE, _INT16_SCALE - 1, out=scaled)
    return scaled.astype(np.int16)


def _as_float32(pcm: np.ndarray) -> np.ndarray:
    """int16 is scaled to [-1, 1); float input is taken as already in that scale."""
    array = np.asarray(pcm)
    if array.dtype == np.int16:
        return int16_to_float(array)
    if array.dtype == np.float32:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise TypeError(f"expected int16 or float PCM, got {array.dtype}")


def _check_chunk_length(samples: int) -> None:
    if samples % DOWN:
        raise ValueError(f"chunk length must be even (whole 2-in/3-out cycles), got {samples}")


class BatchResampler16to24:
    """Independent 16 -> 24 kHz streams for `rows` sessions, resampled together in one matmul.

    Row i of every call continues row i's stream; `reset(rows)` restarts chosen rows (a session
    leaving or joining a slot) without touching the others.
    """

    latency_samples: Final = LATENCY_SAMPLES

    def __init__(self, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"need at least one row, got {rows}")
        self._cycle = _cycle_matrix(prototype_filter())
        self._history = np.zeros((rows, _HISTORY), dtype=np.float32)

    @property
    def rows(self) -> int:
        return self._history.shape[0]

    def reset(self, rows: Rows | None = None) -> None:
        """Forget the history of the given rows (all rows when None), as if freshly created."""
        if rows is None:
            self._history[:] = 0.0
        else:
            self._history[rows] = 0.0

    def process_batch(self, pcm: np.ndarray, rows: Rows | None = None) -> np.ndarray:
        """[B, L] int16 or float32 -> [B, 3L/2] float32; L must be even (320 -> 480 for 20 ms).

        Without `rows`, B must equal `self.rows`. With `rows` (B distinct row indices), only those
        streams advance, e.g. just the slots that received a frame this tick.
        """
        if isinstance(rows, int):
            rows = [rows]
        chunk = _as_float32(pcm)
        if chunk.ndim != 2:
            raise ValueError(f"expected a [batch, samples] array, got shape {chunk.shape}")
        batch, samples = chunk.shape
        _check_chunk_length(samples)
        history = self._history if rows is None else self._history[rows]
        if history.shape[0] != batch:
            raise ValueError(f"got {batch} rows of audio for {history.shape[0]} streams")
        if samples == 0:
            return np.zeros((batch, 0), dtype=np.float32)
        padded = np.concatenate((history, chunk), axis=1)
        cycles = samples // DOWN
        row_stride, sample_stride = padded.strides
        # Window g of a row is padded[2g : 2g + 40]: an overlapping strided view (cheaper to build
        # than with as_strided), copied once by the reshape.
        windows = np.ndarray(
            (batch, cycles, _WINDOW),
            dtype=np.float32,
            buffer=padded,  # contiguous: fresh from concatenate
            strides=(row_stride, DOWN * sample_stride, sample_stride),
        )
        out = np.dot(windows.reshape(batch * cycles, _WINDOW), self._cycle)
        if rows is None:
            self._history = padded[:, -_HISTORY:]
        else:
            self._history[rows] = padded[:, -_HISTORY:]
        return out.reshape(batch, cycles * UP)


class Resampler16to24:
    """One stateful 16 -> 24 kHz stream: `process` 320 samples (20 ms) -> 480 samples."""

    latency_samples: Final = LATENCY_SAMPLES

    def __init__(self) -> None:
        self._batch = BatchResampler16to24(rows=1)

    def reset(self) -> None:
        """Forget the stream's history, as if freshly created."""
        self._batch.reset()

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """[L] int16 or float32 -> [3L/2] float32 (int16 is scaled to [-1, 1)); L must be even."""
        chunk = np.asarray(pcm)
        if chunk.ndim != 1:
            raise ValueError(f"expected a 1-D array of samples, got shape {chunk.shape}")
        return self._batch.process_batch(chunk[np.newaxis, :])[0]
