// What only the page sees of playback, reported to the server as `client_stats` about once a second, and
// the server's per-session `quality` (inside `latency`) read defensively for the quality panel.
//
// The counts come from where they are already kept: the playback worklet's jitter buffer stats
// (underruns, concealedMs, droppedMs, meanBufferMs) and the connection's RttTracker (lastMs). The jitter
// buffer counts for the page's lifetime; the server wants counts since its session started, so the
// reporter takes a baseline at each session_start.

export const CLIENT_STATS_INTERVAL_MS = 1000;
const FRAME_MS = 20;
const MAX_COUNT = Number.MAX_SAFE_INTEGER;
const MAX_MS = 600000; // the server refuses larger (protocol/messages.py: Millis)

export const QUALITY_WARNINGS = Object.freeze([
  'clipping',
  'quiet',
  'noisy',
  'input_loss',
  'output_drops',
  'latency_spikes',
  'playback_gaps',
]);

function finite(value) {
  return typeof value === 'number' && Number.isFinite(value);
}

function count(value) {
  return finite(value) && value > 0 ? Math.min(Math.floor(value), MAX_COUNT) : 0;
}

function millis(value) {
  return finite(value) && value > 0 ? Math.min(value, MAX_MS) : 0;
}

/**
 * The `client_stats` message (JSON text) for these figures; every field within what the server accepts,
 * so a page never earns a `bad_field` for a NaN or a negative number.
 * @param {{underruns?: number, concealedMs?: number, lateFrames?: number, playoutDelayMs?: number,
 *   rttMs?: number|null}} figures
 */
export function clientStatsMessage({ underruns, concealedMs, lateFrames, playoutDelayMs, rttMs = null }) {
  const message = {
    type: 'client_stats',
    underruns: count(underruns),
    concealed_ms: millis(concealedMs),
    late_frames: count(lateFrames),
    playout_delay_ms: millis(playoutDelayMs),
  };
  if (finite(rttMs) && rttMs >= 0) message.rtt_ms = Math.min(rttMs, MAX_MS);
  return JSON.stringify(message);
}

/** Sends one `client_stats` per interval while a session is live, counts since its start. */
export class ClientStatsReporter {
  constructor({ intervalMs = CLIENT_STATS_INTERVAL_MS } = {}) {
    this.intervalMs = intervalMs;
    this.baseline = null;
    this.lastSentMs = null;
  }

  /** A session started: what the jitter buffer counted so far belongs to earlier sessions. */
  startSession(playback, nowMs) {
    this.baseline = {
      underruns: count(playback?.underruns),
      concealedMs: millis(playback?.concealedMs),
      droppedMs: finite(playback?.droppedMs) ? Math.max(0, playback.droppedMs) : 0,
    };
    this.lastSentMs = nowMs;
  }

  stopSession() {
    this.baseline = null;
    this.lastSentMs = null;
  }

  /** The figures since the session started (null when no session is live). */
  figures(playback, rttMs) {
    const base = this.baseline;
    if (base === null) return null;
    const droppedMs = finite(playback?.droppedMs) ? playback.droppedMs : 0;
    const delay = finite(playback?.meanBufferMs) ? playback.meanBufferMs : playback?.bufferMs;
    return {
      underruns: Math.max(0, count(playback?.underruns) - base.underruns),
      concealedMs: Math.max(0, millis(playback?.concealedMs) - base.concealedMs),
      // Audio the jitter buffer threw away because it came too late to play without growing the delay
      // beyond its cap, in 20 ms frames.
      lateFrames: Math.max(0, Math.round((droppedMs - base.droppedMs) / FRAME_MS)),
      playoutDelayMs: delay,
      rttMs,
    };
  }

  /** The message to send now, or null (no session, or not due yet). */
  poll(nowMs, playback, rttMs = null) {
    if (this.baseline === null || nowMs - this.lastSentMs < this.intervalMs) return null;
    this.lastSentMs = nowMs;
    return clientStatsMessage(this.figures(playback, rttMs));
  }
}

/**
 * The `quality` of a server `latency` message, checked field by field: null when absent or not an object;
 * a number that is not finite becomes null, unknown warnings are left out (a newer server may add some).
 * @returns {null|{levelDbfs: number|null, peakDbfs: number|null, clippedPct: number|null,
 *   snrDb: number|null, inputLossPct: number|null, outputDropped: number, spikes: number,
 *   warnings: string[]}}
 */
export function readQuality(latency) {
  const q = latency?.quality;
  if (q === null || typeof q !== 'object' || Array.isArray(q)) return null;
  const num = (value) => (finite(value) ? value : null);
  return {
    levelDbfs: num(q.level_dbfs),
    peakDbfs: num(q.peak_dbfs),
    clippedPct: num(q.clipped_pct),
    snrDb: num(q.snr_db),
    inputLossPct: num(q.input_loss_pct),
    outputDropped: count(q.output_dropped),
    spikes: count(q.spikes),
    warnings: Array.isArray(q.warnings) ? q.warnings.filter((w) => QUALITY_WARNINGS.includes(w)) : [],
  };
}
