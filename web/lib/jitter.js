// Adaptive playout (jitter) buffer for the agent's voice, run inside the playback AudioWorklet.
//
// Frames arrive in 20 ms bursts with network and main-thread jitter; the audio device pulls small render
// quanta (128 samples) at a perfectly steady rate. The buffer trades delay for continuity:
//
// - It starts by waiting until `target` ms are buffered (about 10 ms beyond one frame), then plays.
// - When it runs dry while playing (an underrun) it counts it, raises the target by one step, and once
//   audio flows again by however much longer than that step it stayed dry (so one late burst teaches it
//   the burst's size; a long outage, such as a reconnect, teaches it nothing beyond the step). The target
//   is capped at maxTargetMs. It then waits to refill to the new target before playing again.
// - After a steady stretch with no underrun it lowers the target one step, provided the buffer never
//   dipped into the margin that step would remove. A shrink followed soon by an underrun was premature:
//   the steady stretch required before the next one doubles (up to maxSteadyMsBeforeShrink).
// - Whenever the lowest depth over a short window sits above the level the target calls for, it plays
//   slightly fast (linear-interpolation time compression, 2-5 %, about a third of a semitone) until the
//   excess is gone, so a burst of late frames does not stay as permanent extra delay.
// - It never holds more than capacityMs: on overflow the oldest samples are dropped.
//
// Depths and targets are kept in samples of the buffer's own rate; the public getters report milliseconds.

export const JITTER_DEFAULTS = Object.freeze({
  frameMs: 20,
  initialTargetMs: 30,
  minTargetMs: 30,
  maxTargetMs: 200,
  growStepMs: 20,
  shrinkStepMs: 10,
  // Time played without an underrun before the target steps down; doubles after a premature shrink.
  steadyMsBeforeShrink: 3000,
  maxSteadyMsBeforeShrink: 30000,
  // Running dry for longer than this is an outage (reconnect, stalled tab), not jitter to adapt to.
  outageMs: 300,
  // Window over which the lowest depth is measured to decide whether to catch up.
  windowMs: 500,
  // Excess (lowest depth above target - one frame) tolerated before playing fast.
  toleranceMs: 5,
  catchUpRate: 1.02,
  fastCatchUpRate: 1.05,
  fastCatchUpAboveMs: 60,
  // Hard limit on what is held; null: maxTargetMs + 120 ms.
  capacityMs: null,
});

export class JitterBuffer {
  /**
   * @param {number} sampleRate rate of the samples pushed and pulled
   * @param {Partial<typeof JITTER_DEFAULTS>} [options]
   */
  constructor(sampleRate, options = {}) {
    this.sampleRate = sampleRate;
    this.options = { ...JITTER_DEFAULTS, ...options };
    const o = this.options;
    const samples = (ms) => Math.round((ms * sampleRate) / 1000);
    this.samplesPerMs = sampleRate / 1000;
    this.frameSamples = (o.frameMs * sampleRate) / 1000;
    this.minTarget = samples(o.minTargetMs);
    this.maxTarget = samples(o.maxTargetMs);
    this.initialTarget = Math.min(this.maxTarget, Math.max(this.minTarget, samples(o.initialTargetMs)));
    // The safety margin the smallest target leaves before the next frame lands (10 ms by default).
    this.minMargin = Math.max(0, this.minTarget - this.frameSamples);
    this.growStep = samples(o.growStepMs);
    this.shrinkStep = samples(o.shrinkStepMs);
    this.baseHold = samples(o.steadyMsBeforeShrink);
    this.maxHold = Math.max(this.baseHold, samples(o.maxSteadyMsBeforeShrink));
    this.outage = samples(o.outageMs);
    this.windowSamples = samples(o.windowMs);
    this.tolerance = samples(o.toleranceMs);
    this.fastCatchUpAbove = samples(o.fastCatchUpAboveMs);
    const capacityMs = o.capacityMs ?? o.maxTargetMs + 120;
    this.capacity = Math.max(this.maxTarget + Math.ceil(this.frameSamples), samples(capacityMs));
    this.ring = new Float32Array(this.capacity);
    this.reset();
  }

  /** Empty the buffer and return every adaptive state and counter to its start. */
  reset() {
    this.readPos = 0;
    this.available = 0;
    this.fraction = 0; // read position between ring[readPos] and the next sample, in [0, 1)
    this.target = this.initialTarget;
    this.playing = false;
    this.rate = 1;
    // Shrinking: steady time so far, lowest depth in it, required steady time, time since last shrink.
    this.steadySamples = 0;
    this.steadyMin = Infinity;
    this.hold = this.baseHold;
    this.sinceShrink = Infinity;
    // Dry time after an underrun, measured until audio arrives again; null when not measuring.
    this.drySamples = null;
    this.resetWindow();
    this.underruns = 0;
    this.consumedSamples = 0;
    this.droppedSamples = 0;
    this.pushedSamples = 0;
    // Silence played in place of missing audio once playback had begun (what an underrun costs the ear).
    this.concealedSamples = 0;
    this.started = false;
  }

  resetWindow() {
    this.windowElapsed = 0;
    this.windowMin = Infinity;
    this.windowDepthSum = 0;
    this.windowPulls = 0;
    this.lastWindowMin = null;
    this.lastWindowMean = 0;
  }

  /** Append samples. Returns how many old samples had to be dropped to stay within capacity. */
  push(samples, count = samples.length) {
    this.pushedSamples += count;
    let source = samples;
    if (count > this.capacity) {
      // Only the newest `capacity` samples could ever be kept.
      this.droppedSamples += count - this.capacity;
      source = samples.subarray(count - this.capacity, count);
      count = this.capacity;
    }
    const overflow = this.available + count - this.capacity;
    let dropped = 0;
    if (overflow > 0) {
      this.readPos = (this.readPos + overflow) % this.capacity;
      this.available -= overflow;
      this.fraction = 0;
      this.droppedSamples += overflow;
      dropped = overflow;
    }
    const writePos = (this.readPos + this.available) % this.capacity;
    const firstPart = Math.min(count, this.capacity - writePos);
    this.ring.set(source.subarray(0, firstPart), writePos);
    if (firstPart < count) this.ring.set(source.subarray(firstPart, count), 0);
    this.available += count;
    return dropped;
  }

  /** Fill `out` completely: audio while playing, silence while (re)buffering. */
  pull(out) {
    const n = out.length;
    this.sinceShrink += n;
    if (!this.playing) this.measureDryness(n);
    if (!this.playing && this.available >= this.target) {
      this.playing = true;
      this.started = true;
      this.rate = 1;
    }
    let written = 0;
    if (this.playing) written = this.play(out);
    if (written < n) out.fill(0, written);
    if (this.started) this.concealedSamples += n - written;
    if (this.playing) {
      this.observeDepth(n);
      this.considerShrinking(n);
    }
  }

  /** After an underrun: time until audio flows again, and the extra target growth that it asks for. */
  measureDryness(n) {
    if (this.drySamples === null) return;
    if (this.available === 0) {
      this.drySamples += n;
      return;
    }
    const extra = this.drySamples - this.growStep;
    if (extra > 0 && this.drySamples <= this.outage) {
      this.target = Math.min(this.maxTarget, this.target + extra);
    }
    this.drySamples = null;
  }

  /** Lower the target after a steady period whose lowest depth shows the step is not needed. */
  considerShrinking(n) {
    this.steadySamples += n;
    this.steadyMin = Math.min(this.steadyMin, this.available);
    if (this.steadySamples < this.hold) return;
    const step = Math.min(this.shrinkStep, this.target - this.minTarget);
    // `tolerance` of slack: with no jitter at all the lowest depth sits just under target - one frame.
    if (step > 0 && this.steadyMin + this.tolerance >= step + this.minMargin) {
      this.target -= step;
      this.sinceShrink = 0;
    }
    this.steadySamples = 0;
    this.steadyMin = Infinity;
  }

  /** Copy out audio at the current rate; on running dry, record the underrun. Returns samples written. */
  play(out) {
    const ring = this.ring;
    const capacity = this.capacity;
    const rate = this.rate;
    let readPos = this.readPos;
    let available = this.available;
    let fraction = this.fraction;
    let consumed = 0;
    let i = 0;
    for (; i < out.length; i++) {
      if (available === 0) break;
      const current = ring[readPos];
      // Between two samples only while time-compressing; at rate 1 the fraction stays put.
      const interpolate = fraction > 0 && available > 1;
      out[i] = interpolate ? current + (ring[(readPos + 1) % capacity] - current) * fraction : current;
      fraction += rate;
      let advance = Math.floor(fraction);
      fraction -= advance;
      if (advance >= available) {
        advance = available;
        fraction = 0;
      }
      readPos = (readPos + advance) % capacity;
      available -= advance;
      consumed += advance;
    }
    this.readPos = readPos;
    this.available = available;
    this.fraction = fraction;
    this.consumedSamples += consumed;
    if (i < out.length) this.underrun(out.length - i);
    return i;
  }

  underrun(silentSamples) {
    this.underruns++;
    this.target = Math.min(this.maxTarget, this.target + this.growStep);
    if (this.sinceShrink < 2 * this.hold) this.hold = Math.min(this.maxHold, 2 * this.hold);
    this.drySamples = silentSamples;
    this.playing = false;
    this.rate = 1;
    this.fraction = 0;
    this.steadySamples = 0;
    this.steadyMin = Infinity;
    this.resetWindow();
  }

  /** Track the lowest depth per window and choose the playback rate from it. */
  observeDepth(n) {
    this.windowMin = Math.min(this.windowMin, this.available);
    this.windowDepthSum += this.available;
    this.windowPulls++;
    this.windowElapsed += n;
    if (this.windowElapsed >= this.windowSamples) {
      this.lastWindowMin = this.windowMin;
      this.lastWindowMean = this.windowDepthSum / this.windowPulls;
      this.windowMin = Infinity;
      this.windowDepthSum = 0;
      this.windowPulls = 0;
      this.windowElapsed = 0;
    }
    // Just before the next frame lands the depth should be down to target - one frame.
    const floor = this.target - this.frameSamples;
    if (this.available <= floor || this.lastWindowMin === null) {
      this.rate = 1;
      return;
    }
    const excess = this.lastWindowMin - floor;
    if (excess > this.fastCatchUpAbove) this.rate = this.options.fastCatchUpRate;
    else if (excess > this.tolerance) this.rate = this.options.catchUpRate;
    else if (excess <= 0) this.rate = 1;
  }

  get depthMs() {
    return (this.available - this.fraction) / this.samplesPerMs;
  }

  /** Mean depth over the last full window while playing (the delay the buffer adds), else the depth now. */
  get meanDepthMs() {
    return this.lastWindowMin === null ? this.depthMs : this.lastWindowMean / this.samplesPerMs;
  }

  get targetMs() {
    return this.target / this.samplesPerMs;
  }

  get capacityMs() {
    return this.capacity / this.samplesPerMs;
  }

  get droppedMs() {
    return this.droppedSamples / this.samplesPerMs;
  }

  /** Steady time currently required before the target may step down. */
  get holdMs() {
    return this.hold / this.samplesPerMs;
  }

  /** Whole frames' worth of pushed audio that has been played out (not dropped). */
  get framesPlayed() {
    return Math.floor(this.consumedSamples / this.frameSamples + 1e-9);
  }

  /** Snapshot for the worklet to post to the page. */
  stats() {
    return {
      bufferMs: this.depthMs,
      meanBufferMs: this.meanDepthMs,
      targetMs: this.targetMs,
      underruns: this.underruns,
      framesPlayed: this.framesPlayed,
      droppedMs: this.droppedMs,
      concealedMs: this.concealedSamples / this.samplesPerMs,
      playing: this.playing,
      rate: this.rate,
    };
  }
}
