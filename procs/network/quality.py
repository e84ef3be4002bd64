"""What one session's audio sounds like to the server, sans I/O: level, clipping, SNR, loss, spikes.

`QualityMonitor` is fed by `Session` (procs/network/session.py) where the audio and the VAD's edges pass,
and once a second (with the `latency` report) it gives a `SessionQuality` with warnings a person can act
on. Nothing here reads a clock or does I/O; times come in with the events.

Definitions (the README's "Wire protocol" repeats the thresholds):

* **Level** (`level_dbfs`, `peak_dbfs`, `clipped_pct`): over the input frames of the last report window.
  dBFS is relative to full scale: 0 dBFS is an RMS of 32768 (a full-scale square wave; a full-scale sine
  reads -3 dBFS); digital silence reads -120. A sample is clipped at or within 1 LSB of full scale
  (>= 32766 or <= -32767).
* **Speech and silence**: the VAD process's edges (`VoiceActivity`, forwarded to `Session.voice_activity`)
  carry times on the session's audio clock, where input frame `seq` covers [20 seq, 20 seq + 20) ms. Each
  20 ms frame's mean power is kept until the VAD has had time to say what it was (`VAD_HORIZON_MS` of
  audio behind the newest frame: an `end` edge comes ~130 ms of audio after the time it names, a `start`
  ~30 ms), then labelled by the last edge at or before the frame's centre: speech after `start`, silence
  after `end` and before any edge. Silence frames within `EDGE_GUARD_MS` of an edge are left out of the
  noise floor (speech tails and breaths).
* **SNR** (`snr_db`): S = mean power of the last `SNR_FRAMES` speech frames (speech plus the noise under
  it), N = median power of the last `SNR_FRAMES` silence frames (the median: a click or cough the VAD
  missed does not lift the floor); SNR = 10 log10((S - N) / N), the noise subtracted from the speech
  frames so that the estimate is the speech-to-noise ratio over the speech, clamped to [-20, 100] dB.
  None until there are `SNR_MIN_FRAMES` (0.5 s) of each.
* **Input loss** (`input_loss_pct`): input frames the model never heard, over the frames a real-time
  client would have sent. Two parts: (1) frames that never came: each frame's arrival offset (arrival
  time - seq x 20 ms) against the lowest offset of the session; the lowest offset of the last
  `LOSS_WINDOW_S` of arrivals (jitter only ever delays a frame, so the window's best frame shows where the
  client's clock really is) above the session's lowest, in frames, is how many frames are missing. A frame
  that comes up to 1 s late is jitter, not loss; one still missing after that counts (and stays counted:
  a stall the client makes up for is worked off by catch-up steps, or dropped beyond 640 ms). (2) frames
  that came too late for their block: the inference process's `dropped` count
  (`SessionCounters.input_dropped`).
* **Latency spikes** (`spikes`): a report window is spiking when the p99 of a series in it, and at least
  `SPIKE_MIN_OVER` of its samples, are above
  max(`SPIKE_RATIO` x m, m + `SPIKE_MARGIN_MS`), m the series' running median over the `SPIKE_HISTORY` samples
  before the window. Two series: the server-added latency of each answered block (a stalled step) and each
  input frame's arrival lateness (its offset above the lowest offset of the frames that came in the
  `LOSS_WINDOW_S` after it: a client or network that stalls, then sends what it held back; known one
  window later). A pause that is never made up is loss, not lateness: the frames after it are no
  earlier. Consecutive spiking windows are one spike.

Warnings: `clipping` (> 1 % of the window's samples clipped), `quiet` (the speech of the last 10 s of
audio below -45 dBFS), `noisy` (SNR below 10 dB), `input_loss` (more than 2 % of the frames due in the
last 10 s lost), `output_drops` (more than 2 % of the model's frames of the last 10 s dropped for a client
that did not take them), `latency_spikes` (a spike began in the last 10 s), `playback_gaps` (the page
reported 3 or more underruns or late frames in the last 10 s).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from protocol import ClientStats, SessionQuality
from protocol.messages import QualityWarning

FRAME_MS = 20.0
FULL_SCALE = 32768.0
FLOOR_DBFS = -120.0
_FLOOR_POWER = 10.0 ** (FLOOR_DBFS / 10.0)
CLIP_HIGH, CLIP_LOW = 32766, -32767  # at or within 1 LSB of full scale

# Thresholds of the warnings.
CLIPPING_PCT = 1.0
QUIET_DBFS = -45.0
NOISY_SNR_DB = 10.0
LOSS_PCT = 2.0
OUTPUT_DROP_PCT = 2.0
PLAYBACK_GAPS = 3
RECENT_S = 10.0  # how far back a warning looks

# SNR.
VAD_HORIZON_MS = 1000.0
EDGE_GUARD_MS = 100.0
SNR_FRAMES = 500  # 10 s of speech, 10 s of silence
SNR_MIN_FRAMES = 25
SNR_MIN_DB, SNR_MAX_DB = -20.0, 100.0
QUIET_MIN_FRAMES = 25

# Loss and spikes.
LOSS_WINDOW_S = 1.0
SPIKE_RATIO = 2.0
SPIKE_MARGIN_MS = 50.0
SPIKE_MIN_OVER = 2  # samples above the threshold: one late frame or block is a hiccup, not a spike
SPIKE_HISTORY = 3000  # samples per series (60 s of frame lateness, 4 min of block latencies)
SPIKE_MIN_HISTORY = 25


def to_dbfs(power: float) -> float:
    """dB relative to full scale of a mean power already normalised to full scale (1.0 = 0 dBFS)."""
    return 10.0 * math.log10(max(power, _FLOOR_POWER))


@dataclass(frozen=True, slots=True)
class FrameStats:
    power: float  # mean square, full scale = 1.0
    peak: int  # largest |sample|
    clipped: int  # samples at or within 1 LSB of full scale
    samples: int


def frame_stats(pcm: np.ndarray) -> FrameStats:
    """Level figures of one frame of int16 PCM."""
    x = pcm.astype(np.float64)
    n = int(x.shape[0])
    power = float(np.dot(x, x)) / (n * FULL_SCALE * FULL_SCALE) if n else 0.0
    peak = max(int(pcm.max()), -int(pcm.min())) if n else 0
    clipped = int(np.count_nonzero((pcm >= CLIP_HIGH) | (pcm <= CLIP_LOW)))
    return FrameStats(power, peak, clipped, n)


def snr_db(speech_powers: np.ndarray | list[float], noise_powers: np.ndarray | list[float]) -> float | None:
    """10 log10((mean speech power - noise floor) / noise floor), the floor the median of the silence
    frames' powers; None with fewer than SNR_MIN_FRAMES of either."""
    if len(speech_powers) < SNR_MIN_FRAMES or len(noise_powers) < SNR_MIN_FRAMES:
        return None
    speech = float(np.mean(speech_powers))
    noise = max(float(np.median(noise_powers)), _FLOOR_POWER)
    excess = speech - noise
    if excess <= 0.0:
        return SNR_MIN_DB
    return min(SNR_MAX_DB, max(SNR_MIN_DB, 10.0 * math.log10(excess / noise)))


def spike_threshold_ms(history_median_ms: float) -> float:
    return max(SPIKE_RATIO * history_median_ms, history_median_ms + SPIKE_MARGIN_MS)


def is_spike(window_ms: list[float] | np.ndarray, history_ms: deque[float] | list[float]) -> bool:
    """Whether a window's p99 is above the spike threshold of the history before it."""
    if len(window_ms) == 0 or len(history_ms) < SPIKE_MIN_HISTORY:
        return False
    median = float(np.median(np.fromiter(history_ms, dtype=np.float64, count=len(history_ms))))
    threshold = spike_threshold_ms(median)
    window = np.asarray(window_ms, dtype=np.float64)
    over = int(np.count_nonzero(window > threshold))
    return over >= SPIKE_MIN_OVER and float(np.percentile(window, 99)) > threshold


class SpikeSeries:
    """One series of latencies: this window's samples and the running history they join afterwards."""

    def __init__(self) -> None:
        self.window: list[float] = []
        self.history: deque[float] = deque(maxlen=SPIKE_HISTORY)

    def add(self, ms: float) -> None:
        self.window.append(ms)

    def close_window(self) -> bool:
        spiking = is_spike(self.window, self.history)
        self.history.extend(self.window)
        self.window.clear()
        return spiking


class ArrivalClock:
    """Frames against the real-time clock: how many never came, and how late each one came (see the module
    docstring). Offsets are arrival time - seq x 20 ms; one monotonic deque keeps the minimum offset of the
    frames since the oldest frame whose lateness is not known yet."""

    def __init__(self) -> None:
        self.baseline: float | None = None  # the session's lowest offset, s
        self._mins: deque[tuple[float, float]] = deque()  # (arrival, offset), offsets increasing
        self._pending: deque[tuple[float, float]] = deque()  # frames of the last LOSS_WINDOW_S
        self.missing = 0  # frames not come now
        self.lost = 0  # the most that were missing at a report (monotone, for counters)

    def arrive(self, seq: int, t: float) -> list[float]:
        """Frame `seq` arrived at `t` (s). Returns the lateness (ms) of the frames whose following
        LOSS_WINDOW_S has now passed: a frame is late by how much its offset exceeds the lowest offset of
        the frames that came in the second after it (a frame held up, then made up for by a burst), so a
        frame that follows a lost one is not late: the frames after it are no earlier."""
        offset = t - seq * FRAME_MS / 1e3
        lateness: list[float] = []
        mins, pending = self._mins, self._pending
        while pending and pending[0][0] < t - LOSS_WINDOW_S:
            t_n, offset_n = pending.popleft()
            while len(mins) > 1 and mins[0][0] < t_n:
                mins.popleft()
            lateness.append((offset_n - mins[0][1]) * 1e3)
        while mins and mins[-1][1] >= offset:
            mins.pop()
        mins.append((t, offset))
        pending.append((t, offset))
        while len(mins) > 1 and mins[0][0] < pending[0][0]:  # (arrivals are in order; a clock is not)
            mins.popleft()
        if self.baseline is None or offset < self.baseline:
            self.baseline = offset
        # The best frame of the last second shows where the client's clock is; any lag behind the
        # session's best is frames that did not come.
        self.missing = max(0, round((mins[0][1] - self.baseline) * 1e3 / FRAME_MS))
        return lateness


class SpeechSplit:
    """Frame powers labelled speech or silence by the VAD's edges, once the VAD has had time to speak."""

    def __init__(self) -> None:
        self.pending: deque[tuple[int, float]] = deque()  # (seq, power) not labelled yet
        self.edges: list[tuple[float, bool]] = []  # (t_ms, speech after it), in audio order
        self.speech: deque[tuple[int, float]] = deque(maxlen=SNR_FRAMES)
        self.noise: deque[float] = deque(maxlen=SNR_FRAMES)

    def edge(self, event: Literal["start", "end"], t_ms: float) -> None:
        self.edges.append((t_ms, event == "start"))

    def frame(self, seq: int, power: float) -> None:
        self.pending.append((seq, power))
        horizon = (seq + 1) * FRAME_MS - VAD_HORIZON_MS
        while self.pending and (self.pending[0][0] + 1) * FRAME_MS <= horizon:
            self._label(*self.pending.popleft())

    def _label(self, seq: int, power: float) -> None:
        centre = seq * FRAME_MS + FRAME_MS / 2
        edges = self.edges
        # Edges more than a guard before this frame can no longer matter but for the state they set.
        while len(edges) >= 2 and edges[1][0] <= centre - EDGE_GUARD_MS:
            edges.pop(0)
        before = [e for e in edges if e[0] <= centre]
        speaking = before[-1][1] if before else False
        if speaking:
            self.speech.append((seq, power))
            return
        near = any(abs(t - centre) < EDGE_GUARD_MS for t, _ in edges)
        if not near:
            self.noise.append(power)

    def snr_db(self) -> float | None:
        return snr_db([p for _, p in self.speech], list(self.noise))

    def speech_dbfs(self, newest_seq: int) -> float | None:
        """Mean level of the speech labelled in the last RECENT_S of audio; None with too little of it."""
        since = newest_seq - RECENT_S * 1e3 / FRAME_MS
        recent = [p for s, p in self.speech if s >= since]
        if len(recent) < QUIET_MIN_FRAMES:
            return None
        return to_dbfs(float(np.mean(recent)))


@dataclass(frozen=True, slots=True)
class _Mark:
    """What had been counted at one report, to look back RECENT_S for the warnings."""

    t: float
    due: int  # frames a real-time client would have sent
    lost: int  # of them never heard
    frames_out: int
    output_dropped: int
    gaps: int  # client-reported underruns + late frames
    spikes: int


@dataclass(frozen=True, slots=True)
class QualityReport:
    """One report: what goes on the wire, and what the metrics observe."""

    quality: SessionQuality
    window_frames: int  # input frames in the level window (0: level figures mean nothing)


class QualityMonitor:
    """One session's audio quality. Events: `frame`, `voice_activity`, `block_latency`, `client_stats`;
    `report` once a period."""

    def __init__(self) -> None:
        self.arrivals = ArrivalClock()
        self.split = SpeechSplit()
        self.latency = SpikeSeries()
        self.lateness = SpikeSeries()
        self.spikes = 0
        self._spiking = False
        self._newest_seq = -1
        self._sum_power = 0.0
        self._frames = 0
        self._samples = 0
        self._peak = 0
        self._clipped = 0
        self._marks: deque[_Mark] = deque([_Mark(-math.inf, 0, 0, 0, 0, 0, 0)])  # the session's start
        self._frames_at_report = 0
        # Client-reported counts as accepted (never decreasing; bounded by what is possible).
        self.client_underruns = 0
        self.client_late_frames = 0
        self.client_concealed_ms = 0.0

    # ---- events ------------------------------------------------------------------------------------
    def frame(self, pcm: np.ndarray, seq: int, t: float) -> None:
        """Input frame `seq` (int16 PCM) arrived at `t` seconds."""
        stats = frame_stats(pcm)
        self._sum_power += stats.power * stats.samples
        self._samples += stats.samples
        self._frames += 1
        self._peak = max(self._peak, stats.peak)
        self._clipped += stats.clipped
        self._newest_seq = seq
        for ms in self.arrivals.arrive(seq, t):
            self.lateness.add(ms)
        self.split.frame(seq, stats.power)

    def voice_activity(self, event: Literal["start", "end"], t_ms: float) -> None:
        self.split.edge(event, t_ms)

    def block_latency(self, ms: float) -> None:
        self.latency.add(ms)

    def client_stats(self, stats: ClientStats, session_age_s: float) -> None:
        """The page's counts, kept monotone and within what `session_age_s` of playback allows (a page may
        restart its counts, and nobody may inflate the server's counters beyond one gap per frame)."""
        most_frames = int(session_age_s * 1e3 / FRAME_MS) + 1
        self.client_underruns = max(self.client_underruns, min(stats.underruns, most_frames))
        self.client_late_frames = max(self.client_late_frames, min(stats.late_frames, most_frames))
        self.client_concealed_ms = max(self.client_concealed_ms,
                                       min(stats.concealed_ms, session_age_s * 1e3))

    # ---- the report --------------------------------------------------------------------------------
    def loss(self, dropped: int) -> tuple[int, int]:
        """(frames never heard, frames due) so far: missing now plus dropped by the inference process.

        Missing *now*, not the most ever missing: a stall the client makes up with a burst is missing for a
        moment and then came, and what the inference process could not use of the burst is in `dropped`
        already (counting both would count those frames twice). The counter (`lost`) samples `missing`
        here, once a report, so the few ms of a burst in flight do not reach it either."""
        arrivals = self.arrivals
        arrivals.lost = max(arrivals.lost, arrivals.missing)
        due = self._frames + arrivals.missing
        return min(arrivals.missing + dropped, due), due

    def report(self, now: float, *, dropped: int, frames_out: int, output_dropped: int) -> QualityReport:
        """Close the window and say how the session sounds (call once a report period)."""
        spiking = self.latency.close_window() | self.lateness.close_window()
        if spiking and not self._spiking:
            self.spikes += 1
        self._spiking = spiking

        lost, due = self.loss(dropped)
        gaps = self.client_underruns + self.client_late_frames
        mark = _Mark(now, due, lost, frames_out, output_dropped, gaps, self.spikes)
        self._marks.append(mark)
        while len(self._marks) > 1 and self._marks[1].t <= now - RECENT_S:
            self._marks.popleft()
        past = self._marks[0]

        window_frames = self._frames - self._frames_at_report
        self._frames_at_report = self._frames
        if self._samples:
            level = to_dbfs(self._sum_power / self._samples)
            peak = 20.0 * math.log10(self._peak / FULL_SCALE) if self._peak else FLOOR_DBFS
            clipped_pct = 100.0 * self._clipped / self._samples
        else:
            level, peak, clipped_pct = FLOOR_DBFS, FLOOR_DBFS, 0.0
        self._sum_power, self._samples, self._peak, self._clipped = 0.0, 0, 0, 0

        snr = self.split.snr_db()
        speech = self.split.speech_dbfs(self._newest_seq)
        warnings: list[QualityWarning] = []
        if clipped_pct > CLIPPING_PCT:
            warnings.append("clipping")
        if speech is not None and speech < QUIET_DBFS:
            warnings.append("quiet")
        if snr is not None and snr < NOISY_SNR_DB:
            warnings.append("noisy")
        if _pct(lost - past.lost, due - past.due) > LOSS_PCT:
            warnings.append("input_loss")
        out_delta = output_dropped - past.output_dropped
        if _pct(out_delta, out_delta + frames_out - past.frames_out) > OUTPUT_DROP_PCT:
            warnings.append("output_drops")
        if self.spikes > past.spikes or (spiking and self.spikes):
            warnings.append("latency_spikes")
        if gaps - past.gaps >= PLAYBACK_GAPS:
            warnings.append("playback_gaps")
        quality = SessionQuality(
            level_dbfs=round(level, 1),
            peak_dbfs=round(peak, 1),
            clipped_pct=round(clipped_pct, 3),
            snr_db=None if snr is None else round(snr, 1),
            input_loss_pct=round(_pct(lost, due), 2),
            output_dropped=output_dropped,
            spikes=self.spikes,
            warnings=tuple(warnings),
        )
        return QualityReport(quality, window_frames)


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0
