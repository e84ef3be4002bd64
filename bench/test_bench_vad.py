"""Cost of one Silero window round: 1 session vs 8 sessions in one batched call.

Run: .venv/bin/pytest bench/test_bench_vad.py -s   (per-window numbers are printed with -s)
"""

from __future__ import annotations

import numpy as np
import pytest

from procs.audio.silero import WINDOW_SAMPLES, StreamingVad


def speech_like_windows(n_slots: int, seed: int) -> np.ndarray:
    """One 512-sample window per slot of loud noise: the model's cost does not depend on the content."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3000, (n_slots, WINDOW_SAMPLES)).clip(-32768, 32767).astype(np.int16)


@pytest.mark.parametrize("n_slots", [1, 8])
def test_bench_one_window_round(benchmark, n_slots: int) -> None:
    vad = StreamingVad(n_slots)
    windows = speech_like_windows(n_slots, seed=n_slots)

    rounds = []

    def one_round() -> None:
        for slot in range(n_slots):
            vad.push(slot, windows[slot])
        vad.process()
        rounds.append(1)

    benchmark.pedantic(one_round, rounds=300, iterations=1, warmup_rounds=20)
    assert vad.scored_ms(0) == len(rounds) * WINDOW_SAMPLES / 16  # every round scored one window per slot
    if benchmark.disabled:  # a smoke run (--benchmark-disable): the body ran once, nothing was timed
        return
    stats = benchmark.stats.stats
    print(
        f"\nStreamingVad, {n_slots} session(s), one batched call per 32 ms window: "
        f"median {stats.median * 1e3:.3f} ms per round, "
        f"{stats.median * 1e3 / n_slots:.3f} ms per session-window "
        f"(min {stats.min * 1e3:.3f}, max {stats.max * 1e3:.3f} ms per round)"
    )
