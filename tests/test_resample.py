"""Streaming 16 -> 24 kHz resampler: framing invariance, frequency response, accuracy, state."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procs.audio.resample import (
    LATENCY_SAMPLES,
    BatchResampler16to24,
    Resampler16to24,
    float_to_int16,
    int16_to_float,
    prototype_filter,
)
from tests.support.speech import telugu_speech_16k

IN_RATE, OUT_RATE = 16_000, 24_000


def _frames(signal: np.ndarray, size: int = 320) -> list[np.ndarray]:
    return [signal[i : i + size] for i in range(0, len(signal), size)]


def _resample_framewise(signal: np.ndarray, size: int = 320) -> np.ndarray:
    resampler = Resampler16to24()
    return np.concatenate([resampler.process(frame) for frame in _frames(signal, size)])


def _noise_int16(samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(samples) * 6000).clip(-32768, 32767).astype(np.int16)


def _fft_resample(signal: np.ndarray, out_len: int) -> np.ndarray:
    """Ideal resampling of a periodic, band-limited signal: zero-pad its spectrum."""
    spectrum = np.fft.rfft(signal)
    padded = np.zeros(out_len // 2 + 1, dtype=complex)
    padded[: len(spectrum)] = spectrum
    return np.fft.irfft(padded, n=out_len) * (out_len / len(signal))


def _band_limited_noise(samples: int, cutoff_hz: float, seed: int) -> np.ndarray:
    """Periodic white noise with nothing at or above `cutoff_hz` (exactly, by construction)."""
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(samples))
    spectrum[np.fft.rfftfreq(samples, 1 / IN_RATE) >= cutoff_hz] = 0
    signal = np.fft.irfft(spectrum, n=samples)
    return 0.3 * signal / np.abs(signal).max()


# --- sizes and framing --------------------------------------------------------------------------


def test_one_20ms_frame_in_gives_one_20ms_frame_out() -> None:
    resampler = Resampler16to24()
    for dtype in (np.int16, np.float32):
        out = resampler.process(np.zeros(320, dtype=dtype))
        assert out.shape == (480,)
        assert out.dtype == np.float32
    assert Resampler16to24().process(np.zeros(0, np.int16)).shape == (0,)
    assert Resampler16to24().process(np.zeros(2, np.int16)).shape == (3,)


@pytest.mark.parametrize(
    "bad", [np.zeros(319, np.int16), np.zeros((2, 320), np.int16), np.zeros(320, np.int32)]
)
def test_odd_lengths_wrong_shapes_and_wrong_dtypes_are_refused(bad: np.ndarray) -> None:
    with pytest.raises((ValueError, TypeError)):
        Resampler16to24().process(bad)


def test_framewise_equals_whole_signal() -> None:
    signal = _noise_int16(320 * 50)
    whole = Resampler16to24().process(signal)
    framewise = _resample_framewise(signal)
    assert whole.shape == (480 * 50,)
    np.testing.assert_allclose(framewise, whole, rtol=0, atol=1e-6)


@settings(deadline=None, max_examples=40)
@given(st.lists(st.integers(min_value=0, max_value=400).map(lambda n: 2 * n), min_size=1, max_size=12))
def test_any_even_chunking_gives_the_same_output(chunk_lengths: list[int]) -> None:
    signal = _noise_int16(sum(chunk_lengths), seed=len(chunk_lengths))
    whole = Resampler16to24().process(signal)
    resampler = Resampler16to24()
    bounds = np.cumsum([0, *chunk_lengths])
    pieces = [resampler.process(signal[a:b]) for a, b in itertools.pairwise(bounds)]
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=0, atol=1e-6)


# --- frequency response -------------------------------------------------------------------------


def test_prototype_meets_its_specification() -> None:
    taps = prototype_filter()
    assert len(taps) == 117
    np.testing.assert_allclose(taps, taps[::-1])  # linear phase
    for phase in range(3):
        assert taps[phase::3].sum() == pytest.approx(1.0, abs=1e-12)  # DC gain 1 on every branch
    response = np.abs(np.fft.rfft(taps / 3, 1 << 16))
    freqs = np.fft.rfftfreq(1 << 16, 1 / (3 * IN_RATE))
    gain_db = 20 * np.log10(np.maximum(response, 1e-12))
    assert np.abs(gain_db[freqs <= 7000]).max() < 0.05
    assert gain_db[freqs >= 9000].max() < -60


def test_latency_is_the_impulse_response_peak() -> None:
    impulse = np.zeros(640, np.float32)
    impulse[100] = 1.0  # t = 100 / 16 kHz = 150 / 24 kHz
    out = Resampler16to24().process(impulse)
    assert LATENCY_SAMPLES == Resampler16to24.latency_samples == 29
    assert int(np.argmax(out)) == 150 + LATENCY_SAMPLES


def test_constant_input_gives_constant_output() -> None:
    out = Resampler16to24().process(np.full(3200, 0.5, np.float32))
    settled = out[2 * LATENCY_SAMPLES + 1 :]
    np.testing.assert_allclose(settled, 0.5, rtol=0, atol=1e-6)


@pytest.mark.parametrize("freq_hz", [100.0, 1000.0, 3000.0, 5000.0, 6000.0, 7000.0])
def test_tone_passes_at_unity_gain_and_everything_else_is_60db_down(freq_hz: float) -> None:
    seconds = 1.0
    t = np.arange(int(IN_RATE * seconds)) / IN_RATE
    out = Resampler16to24().process((0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32))
    steady = out[4 * LATENCY_SAMPLES :].astype(np.float64)
    ts = (np.arange(len(steady)) + 4 * LATENCY_SAMPLES - LATENCY_SAMPLES) / OUT_RATE
    # Least-squares fit of the expected tone: its amplitude is the passband gain.
    basis = np.stack([np.sin(2 * np.pi * freq_hz * ts), np.cos(2 * np.pi * freq_hz * ts)], axis=1)
    coeffs, *_ = np.linalg.lstsq(basis, steady, rcond=None)
    assert np.hypot(*coeffs) == pytest.approx(0.5, rel=0.006)  # within 0.05 dB
    assert abs(coeffs[1]) < 1e-3  # in phase with the input once delayed by latency_samples
    residual = steady - basis @ coeffs  # images and aliases, if any
    assert 20 * np.log10(np.sqrt(np.mean(residual**2)) / 0.5 * np.sqrt(2)) < -60


def _band_powers(signal: np.ndarray, rate: int, edges: np.ndarray) -> np.ndarray:
    """Mean power per frequency band (Parseval, with a window whose side lobes are ~-100 dB)."""
    window = np.kaiser(len(signal), 14.0)
    spectrum = np.abs(np.fft.rfft(signal * window)) ** 2 / (len(signal) * np.sum(window**2))
    freqs = np.fft.rfftfreq(len(signal), 1 / rate)
    return np.array([spectrum[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in itertools.pairwise(edges)])


def test_sweep_passband_is_flat_and_images_are_60db_down() -> None:
    """A 50 Hz -> 7 kHz sweep: same level out as in up to 7 kHz; above 9 kHz (images) >= 60 dB down."""
    seconds = 2.0
    t = np.arange(int(IN_RATE * seconds)) / IN_RATE
    f0, f1 = 50.0, 7000.0
    sweep = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2))
    out = Resampler16to24().process(sweep.astype(np.float32)).astype(np.float64)
    # Compare the same stretch of time: drop the output's start-up delay and the input's last 20
    # samples (30 output samples), whose output would come after the end.
    aligned_in = sweep[:-20]
    aligned_out = out[LATENCY_SAMPLES : LATENCY_SAMPLES + len(aligned_in) * 3 // 2]
    edges = np.arange(500.0, 6501.0, 500.0)
    gain_db = 10 * np.log10(
        _band_powers(aligned_out, OUT_RATE, edges) / _band_powers(aligned_in, IN_RATE, edges)
    )
    assert np.abs(gain_db).max() < 0.1
    swept = _band_powers(out, OUT_RATE, np.array([0.0, 7000.0]))[0]
    images = _band_powers(out, OUT_RATE, np.array([9000.0, 12001.0]))[0]
    assert 10 * np.log10(images / swept) < -60


# --- accuracy against an ideal reference ---------------------------------------------------------


def test_matches_fft_resampling_of_a_band_limited_signal() -> None:
    period = IN_RATE  # one second, periodic
    signal = _band_limited_noise(period, cutoff_hz=7000, seed=1)
    # Three periods through the streaming resampler; the middle one is free of start-up transients.
    out = _resample_framewise(np.tile(signal, 3).astype(np.float32))
    ours = out[OUT_RATE + LATENCY_SAMPLES : 2 * OUT_RATE + LATENCY_SAMPLES].astype(np.float64)
    ideal = _fft_resample(signal, OUT_RATE)
    assert np.corrcoef(ours, ideal)[0, 1] > 0.9999
    error_db = 10 * np.log10(np.mean((ours - ideal) ** 2) / np.mean(ideal**2))
    assert error_db < -50


def test_matches_fft_resampling_of_telugu_speech() -> None:
    speech = telugu_speech_16k("నమస్కారం, మీరు ఎలా ఉన్నారు?")
    speech = speech[: len(speech) // 320 * 320]
    out = _resample_framewise(speech)
    assert len(out) == len(speech) * 3 // 2
    ideal = _fft_resample(speech.astype(np.float64) / 32768, len(out))
    ours = out[LATENCY_SAMPLES:].astype(np.float64)
    ideal = ideal[: len(ours)]
    assert np.corrcoef(ours, ideal)[0, 1] > 0.999


# --- state --------------------------------------------------------------------------------------


def test_reset_restores_the_initial_state() -> None:
    first, second = _noise_int16(960, seed=2), _noise_int16(960, seed=3)
    fresh = Resampler16to24().process(second)
    used = Resampler16to24()
    used.process(first)
    assert not np.allclose(used.process(second), fresh)  # history matters...
    used.process(first)
    used.reset()
    np.testing.assert_array_equal(used.process(second), fresh)  # ...and reset forgets it


def test_batch_rows_are_independent_streams() -> None:
    rows, frames = 5, 6
    signals = [_noise_int16(320 * frames, seed=10 + r) for r in range(rows)]
    singles = [_resample_framewise(s) for s in signals]
    batch = BatchResampler16to24(rows)
    assert batch.latency_samples == LATENCY_SAMPLES
    assert batch.rows == rows
    outs = [
        batch.process_batch(np.stack([s[f * 320 : (f + 1) * 320] for s in signals])) for f in range(frames)
    ]
    combined = np.concatenate(outs, axis=1)
    assert combined.shape == (rows, 480 * frames)
    for row in range(rows):
        np.testing.assert_allclose(combined[row], singles[row], rtol=0, atol=1e-6)


def test_batch_subset_of_rows_advances_only_those_rows() -> None:
    signals = [_noise_int16(640, seed=20 + r) for r in range(4)]
    batch = BatchResampler16to24(4)
    batch.process_batch(np.stack([s[:320] for s in signals]))
    # Only rows 1 and 3 get their second frame; 0 and 2 keep their history untouched.
    partial = batch.process_batch(np.stack([signals[1][320:], signals[3][320:]]), rows=[1, 3])
    for out_row, row in enumerate((1, 3)):
        np.testing.assert_allclose(partial[out_row], _resample_framewise(signals[row])[480:], atol=1e-6)
    single = batch.process_batch(signals[2][np.newaxis, 320:], rows=2)
    np.testing.assert_allclose(single[0], _resample_framewise(signals[2])[480:], atol=1e-6)


def test_batch_reset_of_one_row_leaves_the_others() -> None:
    signals = [_noise_int16(640, seed=30 + r) for r in range(3)]
    batch = BatchResampler16to24(3)
    batch.process_batch(np.stack([s[:320] for s in signals]))
    batch.reset(1)
    out = batch.process_batch(np.stack([s[320:] for s in signals]))
    np.testing.assert_allclose(out[0], _resample_framewise(signals[0])[480:], atol=1e-6)
    np.testing.assert_allclose(out[1], Resampler16to24().process(signals[1][320:]), atol=1e-6)
    np.testing.assert_allclose(out[2], _resample_framewise(signals[2])[480:], atol=1e-6)
    with pytest.raises(ValueError):
        batch.process_batch(np.zeros((2, 320), np.int16))  # 2 rows of audio for 3 streams


# --- conversions --------------------------------------------------------------------------------


def test_int16_float_round_trip_is_exact_for_every_value() -> None:
    every = np.arange(-32768, 32768, dtype=np.int16)
    as_float = int16_to_float(every)
    assert as_float.dtype == np.float32
    assert as_float.min() == -1.0
    assert as_float.max() < 1.0
    np.testing.assert_array_equal(float_to_int16(as_float), every)


def test_float_to_int16_rounds_and_saturates() -> None:
    samples = np.array([-2.0, -1.0, -0.5, 0.0, 0.49 / 32768, 0.51 / 32768, 0.5, 1.0, 1.5, 2.0], np.float32)
    np.testing.assert_array_equal(
        float_to_int16(samples), [-32768, -32768, -16384, 0, 0, 1, 16384, 32767, 32767, 32767]
    )
