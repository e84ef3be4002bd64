"""Mouth-to-ear latency measured in real Chromium: capture worklet -> server -> playback worklet.

Headless Chromium (/usr/bin/chromium) opens N pages of the real server's page with `?autostart=1&probe=1`;
Chrome's fake microphone plays a WAV of distinct marker bursts (band-limited pseudo-random noise, 40 ms,
one every 0.4-0.7 s, each with its own seed). With the probe on, the capture worklet records every 16 kHz
sample it produces for the frames it sends and the playback worklet every sample it writes to the output,
each with the `Date.now()` of the render quantum that handled it (web/lib/probe.js). Per session:

  mouth-to-ear   for each marker the capture worklet saw (energy onset), its 75 ms around the onset are
                 resampled to the playback rate and found in what the playback worklet played by
                 normalised cross-correlation (score >= MIN_SCORE, searched up to MAX_LATENCY_MS later);
                 latency = wall time of the quantum that played the onset sample - wall time of the quantum
                 in which the capture worklet produced it. Content, not assumed timing: a marker that did
                 not come back (or came back as something else, as with the demo checkpoint's random
                 weights) is simply not matched.
  its parts      frame fill: a sample's entry into the capture worklet -> its 20 ms frame posted; capture
                 hop: frame posted -> the page hands it to the socket; receive hop: the page gets a frame ->
                 the playback worklet pushes it into the jitter buffer; playout: pushed -> its first sample
                 played. The page's own figures (`window.voiceAgent.stats()`): the mouth-to-ear estimate and
                 its parts, RTT and the server's processing time, sampled at each poll.

The time the fake output device then takes to make the sample audible (`baseLatency + outputLatency`,
which Chromium reports but nobody can hear here) is not part of the measurement.

    .venv/bin/python -m bench.mouth_to_ear --engine loopback --sessions 1,8 --seconds 60
    .venv/bin/python -m bench.mouth_to_ear --engine demo --sessions 1,8 --seconds 60

One Chromium process with N browser contexts (one page each, as N users' browsers would be): N separate
browsers would each bring their own GPU, network and audio-service processes onto the same 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import subprocess
import sys
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MIC_RATE = 16_000
MARKER_S = 0.040
GAP_S = (0.4, 0.7)
BAND_HZ = (300.0, 2000.0)  # low enough that the jitter buffer's 2-5 % catch-up rate keeps the shape
TEMPLATE_BEFORE = 80  # samples at 16 kHz (5 ms) before the onset, and ...
TEMPLATE_AFTER = 1120  # ... 70 ms after it: the whole burst and a little silence
MIN_SCORE = 0.5
MAX_LATENCY_MS = 2000.0
WARMUP_S = 3.0  # markers in each session's first seconds are left out: the jitter buffer is adapting
POLL_S = 2.0
FRAME_SAMPLES_16K = 320


# ---------------------------------------------------------------------------------------------------------
# The fake microphone


def marker_wav(path: Path, seconds: float = 30.0, seed: int = 1212) -> list[float]:
    """Write the fake microphone's WAV (16 kHz mono int16): silence with distinct noise bursts. Returns the
    bursts' start times in seconds (only for reading a trace; matching uses the samples)."""
    rng = np.random.default_rng(seed)
    total = int(seconds * MIC_RATE)
    pcm = np.zeros(total, dtype=np.float64)
    n = int(MARKER_S * MIC_RATE)
    freqs = np.fft.rfftfreq(n * 4, 1 / MIC_RATE)
    band = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    edge = int(0.004 * MIC_RATE)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, math.pi, edge))
    starts: list[float] = []
    t = 0.5
    while t + MARKER_S + 0.2 < seconds:
        spectrum = np.zeros(len(freqs), dtype=complex)
        spectrum[band] = np.exp(2j * math.pi * rng.random(band.sum()))
        burst = np.fft.irfft(spectrum)[:n]
        burst /= np.max(np.abs(burst))
        burst[:edge] *= ramp
        burst[-edge:] *= ramp[::-1]
        i = int(t * MIC_RATE)
        pcm[i : i + n] = 0.5 * burst
        starts.append(i / MIC_RATE)
        t += MARKER_S + rng.uniform(*GAP_S)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(MIC_RATE)
        out.writeframes(np.round(pcm * 32767).astype("<i2").tobytes())
    return starts


# ---------------------------------------------------------------------------------------------------------
# What one page recorded


@dataclass
class Trace:
    """One worklet's record: per render quantum its wall time (ms), sample count and counter, the samples."""

    rate: int = 0
    context_rate: float = 0.0
    walls: list[np.ndarray] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    aux: list[np.ndarray] = field(default_factory=list)
    notes: list[np.ndarray] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)

    def add(self, part: dict[str, Any]) -> None:
        self.rate = int(part["rate"])
        self.context_rate = float(part.get("contextRate") or part["rate"])
        self.walls.append(np.asarray(part["walls"], dtype=np.float64))
        self.frames.append(np.asarray(part["frames"], dtype=np.float64))
        self.counts.append(np.asarray(part["counts"], dtype=np.int64))
        self.aux.append(np.asarray(part["aux"], dtype=np.float64))
        self.notes.append(np.asarray(part["notes"], dtype=np.float64))
        pcm = np.frombuffer(base64.b64decode(part["samples"]), dtype="<i2")
        self.samples.append(pcm.astype(np.float32) / 32767)

    def joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """walls, counts, aux, notes as [k, 2] (wall, value), samples."""
        cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
        notes = cat(self.notes, np.float64).reshape(-1, 2)
        return (cat(self.walls, np.float64), cat(self.counts, np.int64), cat(self.aux, np.float64), notes,
                cat(self.samples, np.float32))

    def clock(self, anchor: str) -> tuple[float, float]:
        """(ms per context frame, ms at frame 0): the context's sample clock on the wall clock.

        The audio device asks for audio in callbacks (10 ms apart with Chromium's fake devices), each
        running a few render quanta back to back at one `Date.now()`. A continuous device clock is
        anchored where the calls pin it: capture at the end of each callback's last quantum (its samples
        were all there by then), playback at the start of each callback's first quantum (nothing is played
        before it is rendered). A straight-line fit through those anchors (the device's rate against the
        wall clock), moved to their median residual so that a late callback (scheduling) moves it no more
        than an early one."""
        walls = np.concatenate(self.walls) if self.walls else np.zeros(0)
        frames = np.concatenate(self.frames) if self.frames else np.zeros(0)
        if len(walls) < 4:
            return 1000.0 / (self.context_rate or 1.0), 0.0
        new_batch = np.concatenate([[True], np.diff(walls) > 0.5])
        if anchor == "end":
            last = np.concatenate([new_batch[1:], [True]])
            x, y = frames[last] + 128, walls[last]
        else:
            x, y = frames[new_batch], walls[new_batch]
        slope, intercept = np.polyfit(x, y, 1)
        intercept += float(np.median(y - (slope * x + intercept)))
        return float(slope), float(intercept)


@dataclass
class PageRecord:
    capture: Trace = field(default_factory=Trace)
    playback: Trace = field(default_factory=Trace)
    sends: list[float] = field(default_factory=list)
    receives: list[float] = field(default_factory=list)
    stats: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (epoch ms, voiceAgent.stats())
    live_wall: float = 0.0  # epoch ms when every page was live: the warm-up counts from here

    def add(self, taken: dict[str, Any], stats: dict[str, Any]) -> None:
        traces = taken["traces"]
        if "capture" in traces:
            self.capture.add(traces["capture"])
        if "playback" in traces:
            self.playback.add(traces["playback"])
        self.sends += taken["sends"]
        self.receives += taken["receives"]
        self.stats.append((time.time() * 1000, stats))


# ---------------------------------------------------------------------------------------------------------
# Analysis


def fft_resample(x: np.ndarray, n_out: int) -> np.ndarray:
    """Band-limited resampling of a short segment that starts and ends in silence (no scipy here)."""
    spectrum = np.fft.rfft(x)
    out = np.zeros(n_out // 2 + 1, dtype=complex)
    keep = min(len(spectrum), len(out))
    out[:keep] = spectrum[:keep]
    return np.fft.irfft(out, n_out) * (n_out / len(x))


def marker_onsets(x: np.ndarray, quiet_before: int = 2400) -> np.ndarray:
    """Sample indices where a burst starts: the 5 ms RMS envelope rises through a fifth of its loud level
    after at least `quiet_before` samples below it."""
    if len(x) < 200:
        return np.zeros(0, dtype=np.int64)
    window = 80
    energy = np.convolve(x.astype(np.float64) ** 2, np.ones(window) / window, mode="same")
    envelope = np.sqrt(energy)
    loud = np.percentile(envelope, 99.5)
    if loud < 1e-3:
        return np.zeros(0, dtype=np.int64)
    above = envelope > 0.2 * loud
    rises = np.flatnonzero(above[1:] & ~above[:-1]) + 1
    onsets = []
    last_above = -quiet_before - 1
    above_idx = np.flatnonzero(above)
    for r in rises:
        # the last loud sample before this rise
        k = np.searchsorted(above_idx, r) - 1
        last_above = above_idx[k] if k >= 0 else -quiet_before - 1
        if r - last_above > quiet_before:
            # back off to where the burst's energy starts (the envelope is centred: half a window early)
            onsets.append(max(0, r - window // 2))
    return np.asarray(onsets, dtype=np.int64)


def normalised_xcorr(y: np.ndarray, template: np.ndarray) -> np.ndarray:
    """For each lag j: <y[j:j+m], t> / (|t| |y[j:j+m]|)."""
    m = len(template)
    if len(y) < m:
        return np.zeros(0)
    n = 1 << math.ceil(math.log2(len(y) + m))
    num = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(template, n)), n)[: len(y) - m + 1]
    power = np.concatenate([[0.0], np.cumsum(y.astype(np.float64) ** 2)])
    local = np.sqrt(np.maximum(power[m:] - power[:-m], 1e-12))
    return num / (np.linalg.norm(template) * local + 1e-12)


def percentile(values: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


@dataclass
class SessionResult:
    markers_seen: int
    markers_matched: int
    latency_ms: list[float]  # on the devices' sample clocks (Trace.clock)
    latency_calls_ms: list[float]  # the same markers on the render calls' own Date.now()
    scores: list[float]
    frame_fill_ms: float | None  # mean wait of a sample in the capture worklet for its frame to be posted
    capture_hop_ms: float | None  # p50: frame posted by the capture worklet -> handed to the socket
    receive_hop_ms: float | None  # p50: frame from the socket -> pushed into the jitter buffer
    playout_ms: float | None  # p50: pushed into the jitter buffer -> its first sample played
    playout_first_of_burst_ms: float | None  # p50 of the same, only for frames that arrived after a gap
    estimate_ms: float | None  # median of the page's own mouth-to-ear estimate
    # ... less its parts outside what the probe times (capture device + resampler before the capture worklet,
    # output device after the playback worklet): the figure comparable with the measured one
    estimate_worklets_ms: float | None
    estimate_parts: dict[str, float | None]
    server_ms: float | None  # median of the page's `serverMs` (the server's own processing per block)
    rtt_ms: float | None
    underruns: int
    playback_rate: int
    # frames of the agent's voice received after the warm-up, against 50 a second: below 1.0 the server
    # (or the page) did not keep up with real time
    output_share: float | None = None

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("latency_ms", "latency_calls_ms", "scores")}
        out["p50_ms"] = percentile(self.latency_ms, 50)
        out["p50_calls_ms"] = percentile(self.latency_calls_ms, 50)
        out["p99_calls_ms"] = percentile(self.latency_calls_ms, 99)
        out["p99_ms"] = percentile(self.latency_ms, 99)
        out["min_ms"] = min(self.latency_ms) if self.latency_ms else None
        out["max_ms"] = max(self.latency_ms) if self.latency_ms else None
        out["score_min"] = min(self.scores) if self.scores else None
        return out


def analyse(record: PageRecord, warmup_s: float = WARMUP_S) -> SessionResult:
    c_walls, c_counts, _, _, c_pcm = record.capture.joined()
    p_walls, p_counts, p_read, p_notes, p_pcm = record.playback.joined()
    p_rate = record.playback.rate or 24_000
    c_sample_wall = np.repeat(c_walls, c_counts)
    p_sample_wall = np.repeat(p_walls, p_counts)
    # The same on the devices' sample clocks (Trace.clock): capture samples spread over their quantum.
    c_frames = np.concatenate(record.capture.frames) if record.capture.frames else np.zeros(0)
    p_frames = np.concatenate(record.playback.frames) if record.playback.frames else np.zeros(0)
    c_slope, c_zero = record.capture.clock("end")
    p_slope, p_zero = record.playback.clock("start")
    c_call = np.repeat(np.arange(len(c_counts)), c_counts)
    c_pos = np.arange(len(c_call)) - np.repeat(np.cumsum(c_counts) - c_counts, c_counts)
    spread = 128 * (c_pos + 1) / np.maximum(c_counts[c_call], 1)  # where in its quantum a 16 kHz sample lies
    c_sample_clock = c_zero + c_slope * (c_frames[c_call] + spread)
    p_call = np.repeat(np.arange(len(p_counts)), p_counts)
    p_pos = np.arange(len(p_call)) - np.repeat(np.cumsum(p_counts) - p_counts, p_counts)
    p_sample_clock = p_zero + p_slope * (p_frames[p_call] + p_pos)
    start_wall = record.live_wall + warmup_s * 1000

    # Mouth-to-ear, marker by marker.
    ratio = p_rate / MIC_RATE
    latencies: list[float] = []
    latencies_calls: list[float] = []
    scores: list[float] = []
    onsets = [int(i) for i in marker_onsets(c_pcm)
              if i >= TEMPLATE_BEFORE and i + TEMPLATE_AFTER <= len(c_pcm) and c_sample_wall[i] >= start_wall]
    for i in onsets:
        template = fft_resample(c_pcm[i - TEMPLATE_BEFORE : i + TEMPLATE_AFTER].astype(np.float64),
                                round((TEMPLATE_BEFORE + TEMPLATE_AFTER) * ratio))
        onset_offset = round(TEMPLATE_BEFORE * ratio)
        t0 = c_sample_wall[i]
        a = int(np.searchsorted(p_sample_wall, t0 - 5.0))
        b = int(np.searchsorted(p_sample_wall, t0 + MAX_LATENCY_MS)) + len(template)
        ncc = normalised_xcorr(p_pcm[a:b].astype(np.float64), template)
        if len(ncc) == 0:
            continue
        j = int(np.argmax(ncc))
        if ncc[j] < MIN_SCORE or a + j + onset_offset >= len(p_sample_wall):
            continue
        latencies.append(float(p_sample_clock[a + j + onset_offset] - c_sample_clock[i]))
        latencies_calls.append(float(p_sample_wall[a + j + onset_offset] - t0))
        scores.append(float(ncc[j]))

    # Frame fill in the capture worklet: sample entry -> its frame posted (the call that completed it).
    cum = np.cumsum(c_counts)
    n_frames = int(cum[-1] // FRAME_SAMPLES_16K) if len(cum) else 0
    post_wall = None
    if n_frames:
        post_wall = c_walls[np.searchsorted(cum, FRAME_SAMPLES_16K * np.arange(1, n_frames + 1))]
    frame_fill = None
    if post_wall is not None:
        entries = c_sample_wall[: n_frames * FRAME_SAMPLES_16K]
        frame_fill = float(np.mean(np.repeat(post_wall, FRAME_SAMPLES_16K) - entries))
    sends = np.asarray(record.sends)
    capture_hop = None
    if post_wall is not None and len(sends):
        k = min(len(sends), len(post_wall))
        capture_hop = percentile(sends[:k] - post_wall[:k], 50)

    # The jitter buffer: each pushed frame's playout delay, and the hop from the socket to the worklet.
    receive_hop = playout = playout_first = None
    if len(p_notes):
        push_wall, pushed_after = p_notes[:, 0], p_notes[:, 1]
        frame_len = np.diff(np.concatenate([[0.0], pushed_after]))
        first_sample = pushed_after - frame_len
        call = np.searchsorted(p_read, first_sample, side="right")  # first call whose read passed it
        ok = call < len(p_walls)
        read_before = np.concatenate([[0.0], p_read])[call[ok]]
        offset = np.clip(first_sample[ok] - read_before, 0, 127)  # its place in that quantum (rate 1)
        delays = p_zero + p_slope * (p_frames[call[ok]] + offset) - push_wall[ok]
        keep = push_wall[ok] >= start_wall
        playout = percentile(delays[keep], 50)
        gap = np.concatenate([[True], np.diff(push_wall) > 10.0])[ok]  # first frame of a burst
        playout_first = percentile(delays[keep & gap], 50)
        receives = np.asarray(record.receives)
        k = min(len(receives), len(push_wall))
        receive_hop = percentile(push_wall[:k] - receives[:k], 50)

    # The page's own figures, after the warm-up.
    stats = [s for t, s in record.stats if t >= start_wall]
    estimates = [s["mouthToEarMs"] for s in stats if isinstance(s.get("mouthToEarMs"), int | float)]
    inside = [s["mouthToEarMs"] - (s["mouthToEarParts"].get("capture") or 0)
              - (s["mouthToEarParts"].get("output") or 0)
              for s in stats if isinstance(s.get("mouthToEarMs"), int | float)]
    part_keys = stats[-1]["mouthToEarParts"].keys() if stats else []
    parts = {k: percentile([s["mouthToEarParts"][k] for s in stats
                            if isinstance(s["mouthToEarParts"].get(k), int | float)], 50) for k in part_keys}
    return SessionResult(
        markers_seen=len(onsets),
        markers_matched=len(latencies),
        latency_ms=latencies,
        latency_calls_ms=latencies_calls,
        scores=scores,
        frame_fill_ms=frame_fill,
        capture_hop_ms=capture_hop,
        receive_hop_ms=receive_hop,
        playout_ms=playout,
        playout_first_of_burst_ms=playout_first,
        estimate_ms=percentile(estimates, 50),
        estimate_worklets_ms=percentile(inside, 50),
        estimate_parts=parts,
        server_ms=percentile([s["serverMs"] for s in stats if isinstance(s.get("serverMs"), int | float)],
                             50),
        rtt_ms=percentile([s["rttMs"] for s in stats if isinstance(s.get("rttMs"), int | float)], 50),
        underruns=int(stats[-1]["underruns"]) if stats else 0,
        playback_rate=p_rate,
        output_share=output_share(record, start_wall),
    )


def output_share(record: PageRecord, start_wall: float) -> float | None:
    """Frames received from `start_wall` to the last poll, over the 50 a second real time asks for."""
    if not record.stats or record.stats[-1][0] <= start_wall:
        return None
    received = sum(1 for t in record.receives if start_wall <= t <= record.stats[-1][0])
    return received / (50 * (record.stats[-1][0] - start_wall) / 1000)


# ---------------------------------------------------------------------------------------------------------
# Running pages


def run_pages(server_url: str, sessions: int, seconds: float, microphone_wav: Path,
              poll_s: float = POLL_S, live_timeout_s: float = 60.0, server_pids: list[int] | None = None,
              cpu_out: dict[str, float] | None = None) -> list[PageRecord]:
    """Open `sessions` pages (one Chromium, one context each), wait until all are live, record for
    `seconds` (pulling each page's probe every `poll_s`), and return what each page recorded. With
    `cpu_out`, fills it with the % of one core used over the recording by the server (`server_pids` and
    their children), the browser (everything else this process started, Playwright's driver included),
    and the whole machine."""
    from playwright.sync_api import sync_playwright

    from tests.support.chromium import CHROMIUM, chromium_flags
    from tests.support.launcher import cpu_seconds, machine_busy_s, process_tree

    def cpu_now() -> tuple[float, float, float, float]:
        server = {p for root in server_pids or [] for p in process_tree(root)}
        mine = set(process_tree(os.getpid())) - server - {os.getpid()}
        return (time.monotonic(), sum(map(cpu_seconds, server)), sum(map(cpu_seconds, mine)),
                machine_busy_s())

    records = [PageRecord() for _ in range(sessions)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=chromium_flags(microphone_wav, many_pages=True))
        try:
            pages = [browser.new_context().new_page() for _ in range(sessions)]
            errors: list[str] = []
            for page in pages:
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(server_url + "/?autostart=1&probe=1")
            for page in pages:
                page.wait_for_function("() => window.voiceAgent?.stats().state === 'live'",
                                       timeout=live_timeout_s * 1000, polling=100)
            live_wall = time.time() * 1000
            cpu0 = cpu_now()
            for record in records:
                record.live_wall = live_wall
            deadline = time.monotonic() + seconds
            while True:
                for page, record in zip(pages, records, strict=True):
                    taken, stats = page.evaluate("[window.voiceAgentProbe.take(), window.voiceAgent.stats()]")
                    record.add(taken, stats)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if cpu_out is not None and left <= poll_s:  # the last interval: before the pages close
                    cpu1 = cpu_now()
                    wall = cpu1[0] - cpu0[0]
                    cpu_out.update(server=100 * (cpu1[1] - cpu0[1]) / wall,
                                   browser=100 * (cpu1[2] - cpu0[2]) / wall,
                                   machine=100 * (cpu1[3] - cpu0[3]) / wall)
                # Paces the pulls (each takes what accumulated meanwhile); nothing waits on this for order.
                pages[0].wait_for_timeout(min(poll_s, left) * 1000)
            if errors:
                raise RuntimeError(f"page errors: {errors}")
        finally:
            browser.close()
    return records


def server_args(engine: str, sessions: int) -> tuple[str, ...]:
    args = ("--max-sessions", str(max(sessions, 1)))
    return ("--engine", "loopback", *args) if engine == "loopback" else args


def measure(engine: str, sessions: int, seconds: float, microphone_wav: Path) -> list[SessionResult]:
    from tests.support.launcher import ServerProcess

    if engine != "loopback":
        subprocess.run([sys.executable, "-m", "procs.model.build_demo"], check=True, capture_output=True)
    cpu: dict[str, float] = {}
    with ServerProcess(*server_args(engine, sessions)) as server:
        records = run_pages(server.url, sessions, seconds, microphone_wav,
                            server_pids=[server.proc.pid], cpu_out=cpu)
    print(f"{engine} x{sessions}: CPU % of one core over the recording: "
          + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()), flush=True)
    return [analyse(record) for record in records]


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(rows: list[tuple[str, int, list[SessionResult]]]) -> str:
    columns = [
        "engine", "sessions", "markers matched / seen",
        "mouth-to-ear p50 / p99 ms (median of the sessions' p50s / worst session's p99)",
        "all sessions pooled p50 / p99 / max ms", "page estimate p50 ms",
        "page estimate less capture & output devices p50 ms", "frame fill ms (mean)", "capture hop ms",
        "server ms (page)", "receive hop ms", "playout ms (all frames / first of a burst)", "underruns",
        "output / real time (lowest session)",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for engine, n, results in rows:
        pooled = [x for r in results for x in r.latency_ms]
        p50s = [p for r in results if (p := percentile(r.latency_ms, 50)) is not None]
        p99s = [p for r in results if (p := percentile(r.latency_ms, 99)) is not None]

        def med(attr: str, results: list[SessionResult] = results) -> str:
            return fmt(percentile([v for r in results if (v := getattr(r, attr)) is not None], 50))

        cells = [
            engine, str(n),
            f"{sum(r.markers_matched for r in results)} / {sum(r.markers_seen for r in results)}",
            f"{fmt(percentile(p50s, 50))} / {fmt(max(p99s) if p99s else None)}",
            f"{fmt(percentile(pooled, 50))} / {fmt(percentile(pooled, 99))} / "
            f"{fmt(max(pooled) if pooled else None)}",
            med("estimate_ms"), med("estimate_worklets_ms"), med("frame_fill_ms"), med("capture_hop_ms"),
            med("server_ms"), med("receive_hop_ms"),
            f"{med('playout_ms')} / {med('playout_first_of_burst_ms')}",
            str(sum(r.underruns for r in results)),
            fmt(min((r.output_share for r in results if r.output_share is not None), default=None), 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="loopback", help="loopback, demo, or both")
    parser.add_argument("--sessions", default="1,8", help="comma-separated session counts")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path, default=None, help="write every session's figures here")
    args = parser.parse_args(argv)
    engines = ["loopback", "demo"] if args.engine == "both" else [args.engine]
    counts = [int(v) for v in args.sessions.split(",") if v.strip()]
    import tempfile

    rows: list[tuple[str, int, list[SessionResult]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "markers_16k.wav"
        marker_wav(wav)
        for engine in engines:
            for n in counts:
                results = measure(engine, n, args.seconds, wav)
                rows.append((engine, n, results))
                for k, r in enumerate(results):
                    print(engine, n, k, json.dumps(r.summary()), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([{"engine": e, "sessions": n, "results": [r.summary() for r in rs]}
                                         for e, n, rs in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
