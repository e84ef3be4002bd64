// Mouth-to-ear probe: what the capture and playback worklets saw, sample by sample, with wall-clock times,
// so that a benchmark can find the same sound on both sides (by correlating the samples) and time it.
//
// Off unless the page is opened with `?probe=1`; then each worklet keeps a `ProbeTrace` (one null check per
// render quantum when off). Times are `Date.now()` in milliseconds on both audio threads: the
// AudioWorkletGlobalScope has no `performance`, and the two AudioContexts have clocks of their own, so the
// epoch clock is the one clock both worklets and the page share (the page's own marks use
// `performance.timeOrigin + performance.now()`, the same epoch at a finer grain).
//
// Per render quantum (`process()` call) a trace records: the wall time of the call, the context's
// `currentFrame`, how many samples the worklet handed over in it (capture: 16 kHz samples it produced for
// the frames it sends; playback: samples it wrote to the output), a worklet-specific counter (`aux`:
// playback: the jitter buffer's consumed input samples after the call), and the samples themselves.
// `note(value)` records an event between calls (playback: a frame pushed into the jitter buffer, with the
// buffer's pushed-sample count after it).

/** True when the page's URL asks for the probe (`?probe=1`). */
export function probeEnabled(href) {
  try {
    return new URL(href).searchParams.get('probe') === '1';
  } catch {
    return false;
  }
}

const CALLS_PER_POST = 48; // ~128 ms of calls at 48 kHz, ~256 ms at 24 kHz: a few posts a second

/** Worklet side: records quanta and posts them in batches as `{type: 'probe', kind, ...}`. */
export class ProbeTrace {
  /** @param {MessagePort} port @param {string} kind @param {number} rate rate of the recorded samples */
  constructor(port, kind, rate, maxSamplesPerCall = 256) {
    this.port = port;
    this.kind = kind;
    this.rate = rate;
    this.maxSamplesPerCall = maxSamplesPerCall;
    this.notes = [];
    this.allocate();
  }

  allocate() {
    this.calls = 0;
    this.used = 0;
    this.walls = new Float64Array(CALLS_PER_POST);
    this.frames = new Float64Array(CALLS_PER_POST);
    this.counts = new Int32Array(CALLS_PER_POST);
    this.aux = new Float64Array(CALLS_PER_POST);
    this.samples = new Float32Array(CALLS_PER_POST * this.maxSamplesPerCall);
  }

  /** One render quantum: `count` samples of `samples` handed over at `currentFrame`. */
  call(currentFrame, samples, count, aux = 0) {
    const i = this.calls;
    this.walls[i] = Date.now();
    this.frames[i] = currentFrame;
    const kept = Math.min(count, this.maxSamplesPerCall);
    this.counts[i] = kept;
    this.aux[i] = aux;
    this.samples.set(samples.subarray(0, kept), this.used);
    this.used += kept;
    this.calls = i + 1;
    if (this.calls === CALLS_PER_POST) this.flush();
  }

  /** An event between calls: its wall time and a value. */
  note(value) {
    this.notes.push(Date.now(), value);
  }

  flush() {
    const samples = this.samples.slice(0, this.used);
    const message = {
      type: 'probe',
      kind: this.kind,
      rate: this.rate,
      // The context's own rate, that of `frames` (a global of AudioWorkletGlobalScope).
      contextRate: globalThis.sampleRate ?? this.rate,
      walls: this.walls.slice(0, this.calls),
      frames: this.frames.slice(0, this.calls),
      counts: this.counts.slice(0, this.calls),
      aux: this.aux.slice(0, this.calls),
      samples,
      notes: Float64Array.from(this.notes),
    };
    this.port.postMessage(message, [samples.buffer]);
    this.notes = [];
    this.calls = 0;
    this.used = 0;
  }
}

function nowMs() {
  return performance.timeOrigin + performance.now();
}

function concat(chunks, Type) {
  const out = new Type(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** Float samples in [-1, 1] as little-endian int16, base64: compact for a test harness to pull. */
export function int16Base64(samples) {
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    pcm[i] = Math.round(s * 32767);
  }
  const bytes = new Uint8Array(pcm.buffer);
  let binary = '';
  const step = 0x8000;
  for (let i = 0; i < bytes.length; i += step) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + step));
  }
  return btoa(binary);
}

/** Page side: collects the worklets' batches and the page's own send/receive marks until `take()`. */
export class ProbeCollector {
  constructor() {
    this.kinds = new Map();
    this.sends = [];
    this.receives = [];
  }

  /** A `{type: 'probe'}` message from a worklet. */
  add(message) {
    let kind = this.kinds.get(message.kind);
    if (kind === undefined) {
      kind = { rate: message.rate, contextRate: message.contextRate, parts: [] };
      this.kinds.set(message.kind, kind);
    }
    kind.parts.push(message);
  }

  /** The page handed a captured frame to the socket. */
  sent() {
    this.sends.push(nowMs());
  }

  /** The socket delivered a frame of the agent's voice to the page. */
  received() {
    this.receives.push(nowMs());
  }

  /** Everything recorded since the last call, JSON-ready (samples as base64 int16), and forget it. */
  take() {
    const out = { sends: this.sends, receives: this.receives, traces: {} };
    for (const [name, kind] of this.kinds) {
      const parts = kind.parts;
      out.traces[name] = {
        rate: kind.rate,
        contextRate: kind.contextRate,
        walls: Array.from(concat(parts.map((p) => p.walls), Float64Array)),
        frames: Array.from(concat(parts.map((p) => p.frames), Float64Array)),
        counts: Array.from(concat(parts.map((p) => p.counts), Int32Array)),
        aux: Array.from(concat(parts.map((p) => p.aux), Float64Array)),
        notes: Array.from(concat(parts.map((p) => p.notes), Float64Array)),
        samples: int16Base64(concat(parts.map((p) => p.samples), Float32Array)),
      };
      kind.parts = [];
    }
    this.sends = [];
    this.receives = [];
    return out;
  }
}
