"""A minimal Prometheus text-format registry owned by the network process.

Small enough to write by hand, and it keeps the registry an explicit object (no process-global default
registry as in prometheus_client). The one labelled family (sessions per quality warning) is a gauge set at
scrape time; that and histograms are all this server needs, so prometheus_client is not worth a dependency.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import get_args

from protocol.messages import QualityWarning

# Fine below 5 ms, where the loopback goal (p99 < 2 ms) is judged; coarse above, where model steps live.
LATENCY_BUCKETS = (
    0.0001,
    0.0002,
    0.0003,
    0.0005,
    0.00075,
    0.001,
    0.00125,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
)
# Input level per report window (dBFS, RMS): -45 is the "quiet" warning's line, above -6 loud speech.
LEVEL_BUCKETS = (-90.0, -80.0, -70.0, -60.0, -50.0, -45.0, -40.0, -35.0, -30.0, -25.0, -20.0, -15.0, -10.0,
                 -6.0, -3.0, 0.0)
# SNR (dB): below 10 is the "noisy" warning; 30 and more is a quiet room.
SNR_BUCKETS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0)
# What the page reports: its jitter buffer's delay and the round trip (seconds).
PLAYOUT_BUCKETS = (0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5)
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
# A resume's gap: the server noticing the drop -> the new connection re-attaching (the page's reconnect).
GAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.2, 0.4)


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help, self.value = name, help_text, 0.0

    def inc(self, n: float = 1.0) -> None:
        self.value += n

    def samples(self) -> list[str]:
        return [f"{self.name} {_fmt(self.value)}"]


class Gauge(Counter):
    kind = "gauge"

    def set(self, v: float) -> None:
        self.value = v


class SummedCounter(Counter):
    """A counter whose value is a sum kept elsewhere (every session's own count), set at scrape time."""

    def set_total(self, v: float) -> None:
        if v < self.value:
            raise ValueError(f"{self.name} would go down from {self.value} to {v}")
        self.value = v


class LabelledGauge:
    """One gauge per value of one label, all set at scrape time (`set_all`)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, label: str, values: Sequence[str]) -> None:
        self.name, self.help, self.label = name, help_text, label
        self.values: dict[str, float] = dict.fromkeys(values, 0.0)

    def set_all(self, values: dict[str, float]) -> None:
        for key in self.values:
            self.values[key] = values.get(key, 0.0)

    def samples(self) -> list[str]:
        return [f'{self.name}{{{self.label}="{key}"}} {_fmt(v)}' for key, v in self.values.items()]


class LabelledCounter(LabelledGauge):
    """One counter per value of one label (its values known up front, so every series shows from 0)."""

    kind = "counter"

    def inc(self, key: str, n: float = 1.0) -> None:
        self.values[key] += n


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name, self.help = name, help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def samples(self) -> list[str]:
        out, acc = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {acc}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {_fmt(self.sum)}")
        out.append(f"{self.name}_count {self.count}")
        return out


class ServerMetrics:
    """The series `GET /metrics` exposes."""

    def __init__(self, workers: Sequence[str], resume_refusals: Sequence[str] = ()) -> None:
        """`workers`: the inference workers' names (procs/topology.py), one series each below;
        `resume_refusals`: why a resume may be refused (procs/network/resume.py), likewise."""
        self.sessions_active = Gauge("voice_sessions_active", "Sessions holding a slot now")
        self.sessions_max = Gauge("voice_sessions_max", "Sessions held at once (the ready workers' sum)")
        self.worker_up = LabelledGauge("voice_worker_up", "1 while the inference worker is ready, 0 while it "
                                       "starts, restarts or is stalled", "worker", workers)
        self.worker_sessions_active = LabelledGauge(
            "voice_worker_sessions_active", "Sessions holding a slot of the inference worker now", "worker",
            workers)
        self.worker_sessions_max = LabelledGauge(
            "voice_worker_sessions_max", "Sessions the inference worker holds at once (0 until it is ready)",
            "worker", workers)
        self.sessions_total = Counter("voice_sessions_total", "Sessions accepted")
        self.sessions_rejected = Counter("voice_sessions_rejected_total", "Sessions refused (capacity)")
        # Resume (procs/network/resume.py, `--resume-window`).
        self.sessions_detached = Gauge(
            "voice_sessions_detached", "Sessions whose link dropped, kept for a resume (they hold a slot)")
        self.sessions_resumed = Counter("voice_sessions_resumed_total", "Sessions a new connection resumed")
        self.resume_failures = LabelledCounter(
            "voice_resume_failures_total", "Resume attempts refused (a fresh session was started instead)",
            "reason", resume_refusals)
        self.resume_gap_seconds = Histogram(
            "voice_resume_gap_seconds", "A resumed session's gap: its link dropped -> a new one re-attached",
            GAP_BUCKETS)
        # Sums of every session's counters (procs.network.session.SessionCounters), set at scrape time.
        self.frames_in = SummedCounter("voice_frames_in_total", "Client audio frames received")
        self.frames_out = SummedCounter("voice_frames_out_total", "Model audio frames sent")
        self.input_frames_dropped = SummedCounter(
            "voice_input_frames_dropped_total",
            "Client audio frames the model never heard because the session fell behind",
        )
        self.input_frames_realigned = SummedCounter(
            "voice_input_frames_realigned_total",
            "Client audio frames dropped or repeated to keep a session on the step clock (clock drift)",
        )
        self.input_frames_rate_limited = SummedCounter(
            "voice_input_frames_rate_limited_total",
            "Client audio frames refused because they came far faster than real time",
        )
        self.output_frames_dropped = SummedCounter(
            "voice_output_frames_dropped_total",
            "Model audio frames never sent because the client did not take them in time",
        )
        self.protocol_errors = SummedCounter("voice_protocol_errors_total", "Malformed client messages")
        # Audio quality (procs.network.quality).
        self.input_frames_lost = SummedCounter(
            "voice_input_frames_lost_total",
            "Client audio frames that never came (still missing 1 s after they were due)",
        )
        self.latency_spikes = SummedCounter(
            "voice_latency_spikes_total",
            "Latency spikes: report windows whose p99 rose above a session's running median (consecutive "
            "windows count once)",
        )
        self.client_underruns = SummedCounter(
            "voice_client_underruns_total",
            "Playback underruns the pages reported (gaps concealed with silence)",
        )
        self.client_late_frames = SummedCounter(
            "voice_client_late_frames_total", "Model audio frames the pages reported discarding as too late"
        )
        self.client_concealed_seconds = SummedCounter(
            "voice_client_concealed_seconds_total", "Silence the pages played in place of missing audio"
        )
        self.input_level_dbfs = Histogram(
            "voice_input_level_dbfs", "Input RMS level per session and second (dBFS)", LEVEL_BUCKETS
        )
        self.snr_db = Histogram(
            "voice_snr_db", "Estimated input SNR per session and second (speech over the noise floor, dB)",
            SNR_BUCKETS,
        )
        self.client_playout_delay_seconds = Histogram(
            "voice_client_playout_delay_seconds", "Jitter-buffer delay the pages reported", PLAYOUT_BUCKETS
        )
        self.client_rtt_seconds = Histogram(
            "voice_client_rtt_seconds", "Ping round trips the pages reported", RTT_BUCKETS
        )
        self.sessions_warned = LabelledGauge(
            "voice_sessions_quality_warning", "Sessions whose last quality report carries this warning",
            "warning", get_args(QualityWarning),
        )
        self.step_seconds = Histogram("voice_step_seconds", "Batched model step duration", STEP_BUCKETS)
        self.step_wait_seconds = Histogram(
            "voice_step_wait_seconds", "Time a ready 80 ms block waited for its step", LATENCY_BUCKETS
        )
        self.frame_latency_seconds = Histogram(
            "voice_frame_latency_seconds",
            "Server-added latency: last input frame of a block received -> first output frame sent",
            LATENCY_BUCKETS,
        )

    def render(self) -> str:
        lines: list[str] = []
        for m in vars(self).values():
            lines.append(f"# HELP {m.name} {m.help}")
            lines.append(f"# TYPE {m.name} {m.kind}")
            lines.extend(m.samples())
        return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))
