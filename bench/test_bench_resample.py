"""Cost of resampling one 20 ms frame, alone and for 8 sessions at once.

Run: pytest bench/test_bench_resample.py -s
"""

from __future__ import annotations

from typing import Any

import numpy as np

from procs.audio.resample import BatchResampler16to24, Resampler16to24, float_to_int16


def _frames(rows: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((rows, 320)) * 5000).astype(np.int16)


def test_resample_one_frame(benchmark: Any) -> None:
    resampler = Resampler16to24()
    frame = _frames(1)[0]
    assert benchmark(resampler.process, frame).shape == (480,)


def test_resample_batch_of_8(benchmark: Any) -> None:
    resampler = BatchResampler16to24(8)
    frames = _frames(8)
    assert benchmark(resampler.process_batch, frames).shape == (8, 480)


def test_resample_batch_of_8_to_int16(benchmark: Any) -> None:
    """The full per-tick conversion the inference process needs: int16 in, resample, int16 out."""
    resampler = BatchResampler16to24(8)
    frames = _frames(8)
    assert benchmark(lambda: float_to_int16(resampler.process_batch(frames))).dtype == np.int16
