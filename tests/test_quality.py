"""The audio-quality estimators, driven directly (procs/network/quality.py) and through a `Session`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from procs.frames import ModelFrame
from procs.network.quality import (
    FRAME_MS,
    SNR_MIN_FRAMES,
    ArrivalClock,
    QualityMonitor,
    SpeechSplit,
    SpikeSeries,
    frame_stats,
    is_spike,
    snr_db,
    to_dbfs,
)
from procs.network.session import Phase, Session
from procs.network.wires import PcmWire
from protocol import (
    IN_FRAME_SAMPLES,
    OUT_FRAME_BYTES,
    ClientStats,
    Error,
    ErrorCode,
    Latency,
    encode_client_audio,
    encode_client_control,
    session_start,
)

RNG = np.random.default_rng(12)


def noise_frame(rms: float) -> np.ndarray:
    return np.clip(np.round(RNG.normal(0.0, rms, IN_FRAME_SAMPLES)), -32768, 32767).astype(np.int16)


def tone_frame(amplitude: float, seq: int) -> np.ndarray:
    t = (seq * IN_FRAME_SAMPLES + np.arange(IN_FRAME_SAMPLES)) / 16000
    return np.clip(np.round(amplitude * np.sin(2 * np.pi * 440 * t)), -32768, 32767).astype(np.int16)


# ---- levels --------------------------------------------------------------------------------------------


def test_levels_of_known_signals() -> None:
    square = np.full(IN_FRAME_SAMPLES, 32767, dtype=np.int16)
    square[::2] = -32768
    stats = frame_stats(square)
    assert to_dbfs(stats.power) == pytest.approx(0.0, abs=0.01)
    assert stats.clipped == IN_FRAME_SAMPLES and stats.peak == 32768
    sine = tone_frame(32767 * 10 ** (-20 / 20), 0)  # peak -20 dBFS: RMS 3 dB lower
    assert to_dbfs(frame_stats(sine).power) == pytest.approx(-23.0, abs=0.1)
    assert frame_stats(sine).clipped == 0
    assert to_dbfs(frame_stats(np.zeros(IN_FRAME_SAMPLES, dtype=np.int16)).power) == -120.0
    near = np.array([32766, -32767, 32765, -32766, 0], dtype=np.int16)  # within 1 LSB of full scale: 2
    assert frame_stats(near).clipped == 2


# ---- SNR -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("true_db", [0.0, 10.0, 30.0])
def test_snr_of_powers_subtracts_the_noise_under_the_speech(true_db: float) -> None:
    noise = 1e-4 * (1 + 0.05 * RNG.standard_normal(200))
    speech = 1e-4 * 10 ** (true_db / 10) * (1 + 0.5 * RNG.random(200)) / 1.25 + 1e-4
    assert snr_db(speech, noise) == pytest.approx(true_db, abs=0.3)


def test_snr_needs_enough_of_both_and_is_clamped() -> None:
    assert snr_db([1e-2] * (SNR_MIN_FRAMES - 1), [1e-4] * 100) is None
    assert snr_db([1e-2] * 100, [1e-4] * (SNR_MIN_FRAMES - 1)) is None
    assert snr_db([1e-2] * 100, [0.0] * 100) == pytest.approx(100.0)  # digital silence: no measurable noise
    assert snr_db([1e-4] * 100, [2e-4] * 100) == -20.0


def test_speech_split_labels_frames_by_the_vad_edges_it_hears_late() -> None:
    """Speech (a tone at 20 dB over white noise) in [1000, 3000) ms and [4000, 5000) ms; the edges reach
    the split 200 ms of audio after the times they name, as the VAD's do. The noise floor leaves out the
    frames near an edge, and the estimate is the speech-to-noise ratio over the speech."""
    split = SpeechSplit()
    noise_rms, tone_amp = 300.0, 300.0 * 10 ** (20 / 20) * math.sqrt(2)
    speech_spans = [(1000, 3000), (4000, 5000)]
    edges = [(1000, "start"), (3000, "end"), (4000, "start"), (5000, "end")]
    true_speech, true_noise = [], []
    for seq in range(400):  # 8 s
        t = seq * FRAME_MS
        speaking = any(a <= t < b for a, b in speech_spans)
        noise = noise_frame(noise_rms)
        tone = tone_frame(tone_amp, seq) if speaking else np.zeros(IN_FRAME_SAMPLES, dtype=np.int16)
        if speaking:
            true_speech.append(np.mean(tone.astype(float) ** 2))
            true_noise.append(np.mean(noise.astype(float) ** 2))
        for edge_t, event in edges:
            if edge_t + 200 == t:
                split.edge(event, edge_t)  # type: ignore[arg-type]
        split.frame(seq, frame_stats((noise + tone).astype(np.int16)).power)
    truth = 10 * math.log10(np.sum(true_speech) / np.sum(true_noise))
    assert len(split.speech) == 150  # every speech frame labelled once the horizon passed (all 3 s)
    labelled_noise = len(split.noise)
    assert 0 < labelled_noise < 400 - 150 - 3 * 10  # edges' guards left out
    assert split.snr_db() == pytest.approx(truth, abs=0.5)


# ---- loss and lateness ----------------------------------------------------------------------------------


def arrive_all(times: list[float]) -> tuple[ArrivalClock, list[float]]:
    """Frames arriving at `times` (made non-decreasing: a connection delivers in order)."""
    times = list(np.maximum.accumulate(times))
    clock = ArrivalClock()
    lateness = [ms for seq, t in enumerate(times) for ms in clock.arrive(seq, t)]
    return clock, lateness


def test_a_client_that_skips_every_20th_frame_loses_5_percent() -> None:
    times = [i * 0.02 + 0.003 * RNG.random() for i in range(3000) if i % 20 != 19]
    clock, lateness = arrive_all(times)
    due = len(times) + clock.missing
    assert 100 * clock.missing / due == pytest.approx(5.0, abs=0.3)
    assert max(lateness) < 5.0  # a frame after a lost one is not late


def test_a_pause_made_up_is_lateness_not_loss_and_one_never_made_up_is_loss() -> None:
    on_time = [i * 0.02 for i in range(100)]
    caught_up = on_time + [2.5 + 0.001 * k for k in range(25)] + [i * 0.02 for i in range(125, 200)]
    clock, lateness = arrive_all(caught_up)
    assert clock.missing == 0 and max(lateness) == pytest.approx(500.0, abs=1.0)
    skipped = on_time + [2.5 + i * 0.02 for i in range(100)]  # the 25 frames of the pause never come
    clock, lateness = arrive_all(skipped)
    assert clock.missing == 25 and max(lateness) < 1e-6


@pytest.mark.parametrize("stall_s", [1.1, 1.5, 3.0])
def test_a_stall_longer_than_the_window_made_up_is_not_missing(stall_s: float) -> None:
    """Frames held up longer than a second and then sent in a burst came: none is missing afterwards (what
    the inference process could not use of the burst is its `dropped`, counted once, there)."""
    held = round(stall_s / 0.02)
    on_time = [i * 0.02 for i in range(100)]
    burst = [2.0 + stall_s + 0.0005 * k for k in range(held)]
    after = [i * 0.02 for i in range(100 + held, 300 + held)]
    clock, _ = arrive_all(on_time + burst + after)
    assert clock.missing == 0


def test_jitter_and_a_late_first_frame_are_not_loss() -> None:
    times = [0.3] + [i * 0.02 + 0.015 * RNG.random() for i in range(1, 1000)]
    clock, _ = arrive_all(times)
    assert clock.missing == 0


# ---- spikes ---------------------------------------------------------------------------------------------


def test_spike_rule() -> None:
    history = [10.0] * 100
    assert not is_spike([10.0] * 12, history)
    assert not is_spike([10.0] * 11 + [500.0], history)  # one late block or frame is a hiccup
    assert not is_spike([10.0] * 10 + [59.0, 59.0], history)  # within median + 50 ms
    assert is_spike([10.0] * 10 + [61.0, 61.0], history)
    assert not is_spike([10.0] * 10 + [61.0, 61.0], [10.0] * 10)  # too little history to judge
    slow = [100.0] * 100  # a slow session: twice its median
    assert not is_spike([190.0] * 12, slow) and is_spike([210.0] * 12, slow)
    series = SpikeSeries()
    for _ in range(5):
        for _ in range(12):
            series.add(10.0)
        assert not series.close_window()
    series.add(300.0)
    series.add(300.0)
    assert series.close_window()


# ---- the monitor's report -------------------------------------------------------------------------------


def feed(monitor: QualityMonitor, frames: list[np.ndarray], start_seq: int = 0, t0: float = 0.0) -> None:
    for k, pcm in enumerate(frames):
        seq = start_seq + k
        monitor.frame(pcm, seq, t0 + seq * 0.02)


def test_a_stall_made_up_counts_its_dropped_frames_once() -> None:
    """1.5 s held up, then sent in a burst: every frame came, and the inference process dropped 59 of the
    burst it could not use. Loss is those 59 over the frames due, not 59 plus the 75 that were late."""
    monitor = QualityMonitor()
    quiet = np.zeros(IN_FRAME_SAMPLES, dtype=np.int16)
    times = [i * 0.02 for i in range(100)] + [3.5 + 0.0005 * k for k in range(75)]
    times += [i * 0.02 for i in range(175, 350)]
    for seq, t in enumerate(np.maximum.accumulate(times)):  # a connection delivers in order
        monitor.frame(quiet, seq, float(t))
    lost, due = monitor.loss(dropped=59)
    assert (lost, due) == (59, 350)
    assert monitor.arrivals.lost == 0  # nothing missing at the report: the counter counts nothing


def test_clipping_and_quiet_warnings() -> None:
    monitor = QualityMonitor()
    loud = [tone_frame(40000, s) for s in range(50)]
    feed(monitor, loud)
    report = monitor.report(1.0, dropped=0, frames_out=50, output_dropped=0).quality
    assert "clipping" in report.warnings and report.clipped_pct > 1.0
    assert report.peak_dbfs == pytest.approx(0.0, abs=0.01)

    monitor = QualityMonitor()
    monitor.voice_activity("start", 0.0)
    feed(monitor, [tone_frame(32767 * 10 ** (-50 / 20), s) for s in range(150)])  # -53 dBFS speech
    report = monitor.report(3.0, dropped=0, frames_out=150, output_dropped=0).quality
    assert report.warnings == ("quiet",)
    assert report.level_dbfs == pytest.approx(-53.0, abs=0.2)

    monitor = QualityMonitor()
    monitor.voice_activity("start", 0.0)
    feed(monitor, [tone_frame(32767 * 10 ** (-20 / 20), s) for s in range(150)])
    assert monitor.report(3.0, dropped=0, frames_out=150, output_dropped=0).quality.warnings == ()


def test_loss_output_drops_spikes_and_playback_gaps_warn_and_fade() -> None:
    monitor = QualityMonitor()
    quiet = np.zeros(IN_FRAME_SAMPLES, dtype=np.int16)
    seq, received = 0, 0
    warnings: list[tuple[str, ...]] = []
    for second in range(1, 31):
        for _ in range(50):
            if not (3 <= second <= 7 and seq % 10 == 0):  # 10 % lost for five seconds
                monitor.frame(quiet, received, seq * 0.02)
                received += 1
            seq += 1
        for _ in range(12):
            monitor.block_latency(250.0 if second == 12 else 5.0)  # one stalled second
        if second == 18:
            monitor.client_stats(ClientStats(underruns=4, concealed_ms=80.0, late_frames=1,
                                             playout_delay_ms=40.0), session_age_s=second)
        report = monitor.report(float(second), dropped=0, frames_out=50 * second,
                                output_dropped=20 if second >= 24 else 0).quality
        warnings.append(report.warnings)
    assert "input_loss" in warnings[6] and "input_loss" not in warnings[20]
    assert all("latency_spikes" not in w for w in warnings[:11])  # loss is not lateness
    assert "latency_spikes" in warnings[11] and "latency_spikes" not in warnings[25]
    assert "playback_gaps" in warnings[17] and "playback_gaps" not in warnings[29]
    assert "output_drops" in warnings[23]
    assert report.spikes == 1 and report.output_dropped == 20
    assert report.input_loss_pct == pytest.approx(100 * 25 / 1500, abs=0.01)


def test_client_counts_are_monotone_and_bounded_by_the_session_age() -> None:
    monitor = QualityMonitor()
    monitor.client_stats(ClientStats(underruns=3, concealed_ms=60.0, late_frames=2, playout_delay_ms=40.0),
                         session_age_s=10.0)
    monitor.client_stats(ClientStats(underruns=1, concealed_ms=0.0, late_frames=0, playout_delay_ms=40.0),
                         session_age_s=11.0)
    assert (monitor.client_underruns, monitor.client_late_frames, monitor.client_concealed_ms) == (3, 2, 60.0)
    monitor.client_stats(ClientStats(underruns=10**9, concealed_ms=500_000.0, late_frames=10**9,
                                     playout_delay_ms=40.0), session_age_s=2.0)
    assert monitor.client_underruns == 101 and monitor.client_concealed_ms == 2000.0


# ---- through a Session ----------------------------------------------------------------------------------


def test_the_latency_report_carries_the_quality_and_client_stats_are_validated() -> None:
    session = Session(session_start("s1", model="m", demo_weights=True, max_sessions=4), slot=0, gen=1,
                      now=0.0)
    wire = PcmWire(session)  # /ws's edge: client messages in as a page sends them
    pcm = tone_frame(32767 * 10 ** (-20 / 20), 0)
    for i in range(50):
        wire.receive(encode_client_audio(pcm.tobytes()), int(i * 0.02 * 1e9))
    session.model_audio(ModelFrame(seq=0, t_in_ns=int(0.9e9), gen=1, block_pos=0, queue_us=0, step_us=0,
                                   resample_us=0, dropped=0, realigned=0, pcm=bytes(OUT_FRAME_BYTES)))
    while session.next_outgoing(int(0.92e9)) is not None:  # session_start, then the answer (its latency)
        pass
    bad = json.dumps({"type": "client_stats", "underruns": -1, "concealed_ms": 0, "late_frames": 0,
                      "playout_delay_ms": 40})
    wire.receive(bad, int(0.95e9))
    wire.receive(encode_client_control(ClientStats(underruns=2, concealed_ms=40.0, late_frames=1,
                                                      playout_delay_ms=35.0, rtt_ms=3.5)), int(0.96e9))
    session.tick(1.0)
    sent = []
    while (item := session.next_outgoing(int(1e9))) is not None:
        sent.append(item)
    errors = [m for m in sent if isinstance(m, Error)]
    assert [e.code for e in errors] == [ErrorCode.BAD_FIELD] and not errors[0].fatal
    assert session.phase is Phase.OPEN
    session.tick(2.0)
    while (item := session.next_outgoing(int(2e9))) is not None:
        sent.append(item)
    first, second = [m.quality for m in sent if isinstance(m, Latency)]
    assert first is not None and second is not None
    assert first.level_dbfs == pytest.approx(-23.0, abs=0.2)
    assert first.warnings == ("playback_gaps",)  # 2 underruns + 1 late frame
    assert second.level_dbfs == -120.0  # no input in that window (the previous `latency` resent, updated)
    assert session.client_stats is not None and session.client_stats.rtt_ms == 3.5
    c = session.counters
    assert (c.client_underruns, c.client_late_frames, c.client_concealed_us) == (2, 1, 40_000)
