// Mouth-to-ear latency estimate and round-trip tracking for the latency monitor.
//
// The estimate adds every stage a syllable passes through between the user's mouth and their ear:
//   capture buffering  the capture context's base latency (+ resampler delay)
//   network            one round trip (RTT/2 up + RTT/2 down)
//   server             processing time reported by the server's `latency` messages
//   model              Moshi's algorithmic latency, 160 ms (80 ms Mimi frame + 80 ms acoustic delay); with
//                      the loopback engine only the 80 ms frame (it echoes each block, no acoustic delay)
//   playback buffer    how much audio is already buffered when a block of the answer lands
//   audio output       the playback context's baseLatency + outputLatency, where the browser reports them
// A part that is not known yet (no pong, no latency message) counts as 0 and marks the estimate incomplete.
//
// Measured in real Chromium (bench/mouth_to_ear.py, bench/RESULTS.md) two terms used to be counted wrongly:
// - the capture worklet's 20 ms frame is not a stage of its own: a sample waits for its 80 ms block to
//   fill, and its frame fills within that wait (every sample of a block is answered one block after the
//   block's first sample, whatever its place in it), so it was counted twice;
// - the server answers a block with its four frames at once, so a sample waits in the jitter buffer behind
//   what was buffered when its block landed (the depth at arrival), not behind the mean depth, which also
//   counts the block's own 80 ms draining (about 40 ms more on average).

export const MODEL_ALGORITHMIC_MS = 160;
export const MODEL_FRAME_MS = 80;
export const CAPTURE_FRAME_MS = 20;

/** The model part for the engine named in `session_start.model`: loopback has no acoustic delay. */
export function modelLatencyMs(modelName) {
  return modelName === 'loopback' ? MODEL_FRAME_MS : MODEL_ALGORITHMIC_MS;
}

function known(value) {
  return typeof value === 'number' && Number.isFinite(value);
}

/**
 * @param {{
 *   captureFrameMs?: number, captureBaseLatencyMs?: number|null, captureResamplerMs?: number|null,
 *   rttMs?: number|null, serverMs?: number|null, modelMs?: number,
 *   playbackBufferMs?: number|null, outputBaseLatencyMs?: number|null, outputLatencyMs?: number|null,
 * }} inputs
 * @returns {{totalMs: number, complete: boolean, parts: {key: string, label: string, ms: number|null}[]}}
 */
export function estimateMouthToEar(inputs) {
  const {
    // 0 by default: the frame fills within the model's block (see the top of this file).
    captureFrameMs = 0,
    captureBaseLatencyMs = null,
    captureResamplerMs = null,
    rttMs = null,
    serverMs = null,
    modelMs = MODEL_ALGORITHMIC_MS,
    playbackBufferMs = null,
    outputBaseLatencyMs = null,
    outputLatencyMs = null,
  } = inputs;
  const sumKnown = (...values) => values.filter(known).reduce((a, b) => a + b, 0);
  const outputKnown = known(outputBaseLatencyMs) || known(outputLatencyMs);
  const parts = [
    {
      key: 'capture',
      label: 'capture buffering',
      ms: sumKnown(captureFrameMs, captureBaseLatencyMs, captureResamplerMs),
    },
    { key: 'network', label: 'network (RTT/2 × 2)', ms: known(rttMs) ? rttMs : null },
    { key: 'server', label: 'server processing', ms: known(serverMs) ? serverMs : null },
    { key: 'model', label: 'model algorithmic', ms: modelMs },
    { key: 'playback', label: 'playback buffer', ms: known(playbackBufferMs) ? playbackBufferMs : null },
    {
      key: 'output',
      label: 'audio output',
      ms: outputKnown ? sumKnown(outputBaseLatencyMs, outputLatencyMs) : null,
    },
  ];
  // The output device's latency is not reported by every browser; everything else is needed.
  const complete = parts.every((part) => part.key === 'output' || part.ms !== null);
  const totalMs = parts.reduce((sum, part) => sum + (part.ms ?? 0), 0);
  return { totalMs, complete, parts };
}

/** "≈ 285 ms", or "≥ 285 ms" while a part is still unknown. */
export function formatTotal(estimate) {
  return `${estimate.complete ? '≈' : '≥'} ${Math.round(estimate.totalMs)} ms`;
}

/** "20 + 45 + 12 + 160 + 38 + 10 = 285 ms" style rendering of an estimate. */
export function formatEstimate(estimate) {
  const terms = estimate.parts.filter((part) => part.ms !== null).map((part) => Math.round(part.ms));
  const prefix = estimate.complete ? '' : '≥ ';
  return `${terms.join(' + ')} = ${prefix}${Math.round(estimate.totalMs)} ms`;
}

/**
 * Round trips from ping/pong: the latest, a smoothed value, and the minimum seen.
 * Pings carry their own send time (t_ms) so no table of outstanding pings is needed.
 */
export class RttTracker {
  constructor(smoothing = 0.25) {
    this.smoothing = smoothing;
    this.reset();
  }

  reset() {
    this.lastMs = null;
    this.smoothedMs = null;
    this.minMs = null;
    this.samples = 0;
  }

  /** Record a pong received at `nowMs` for a ping sent at `sentMs` (same clock). Returns the RTT. */
  record(sentMs, nowMs) {
    const rtt = nowMs - sentMs;
    if (!known(rtt) || rtt < 0) return null;
    this.lastMs = rtt;
    const previous = this.smoothedMs;
    this.smoothedMs = previous === null ? rtt : previous + this.smoothing * (rtt - previous);
    this.minMs = this.minMs === null ? rtt : Math.min(this.minMs, rtt);
    this.samples++;
    return rtt;
  }
}
