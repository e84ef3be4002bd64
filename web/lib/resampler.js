// Streaming polyphase resampler (Kaiser-windowed sinc) for any pair of integer sample rates.
//
// The rate ratio is kept as an exact fraction up/down (after dividing by the gcd), and the position of
// each output sample is tracked as an integer input index plus an integer phase in [0, up). Nothing is
// accumulated in floating point, so the output count never drifts: 48000 -> 16000 gives exactly one output
// per three inputs, 44100 -> 16000 exactly 160 per 441, forever.
//
// The kernel is linear phase and symmetric; when downsampling its cut-off is placed below the output
// Nyquist frequency (anti-aliasing), when upsampling below the input Nyquist (anti-imaging). Its latency is
// `delayInputSamples` input samples: an output sample is produced only once every input it depends on has
// arrived, which makes chunked processing produce exactly the same samples as one call on the whole signal.
// Output sample n sits exactly at input time n * down / up: the kernel is symmetric about it.
//
// The module is pure (no DOM, no Web Audio) so the AudioWorklets and Node's test runner share it.

/** Greatest common divisor of two non-negative integers. */
export function gcd(a, b) {
  while (b !== 0) [a, b] = [b, a % b];
  return a;
}

/** Modified Bessel function of the first kind, order 0 (series), for the Kaiser window. */
function besselI0(x) {
  let sum = 1;
  let term = 1;
  const halfX = x / 2;
  for (let k = 1; k < 64; k++) {
    term *= (halfX / k) * (halfX / k);
    sum += term;
    if (term < sum * 1e-12) break;
  }
  return sum;
}

const DEFAULTS = Object.freeze({
  // Sinc zero crossings on each side of the centre: more gives a sharper transition band and more delay.
  zeroCrossings: 16,
  // Cut-off as a fraction of the lower Nyquist frequency (0.9 of 8 kHz = 7.2 kHz for 16 kHz output).
  rolloff: 0.9,
  // Kaiser beta 8.6 gives roughly 85 dB of stop-band attenuation.
  kaiserBeta: 8.6,
});

export class StreamingResampler {
  /**
   * @param {number} inRate  input sample rate in Hz (integer)
   * @param {number} outRate output sample rate in Hz (integer)
   * @param {{zeroCrossings?: number, rolloff?: number, kaiserBeta?: number}} [options]
   */
  constructor(inRate, outRate, options = {}) {
    if (!Number.isInteger(inRate) || !Number.isInteger(outRate) || inRate <= 0 || outRate <= 0) {
      throw new RangeError(`sample rates must be positive integers, got ${inRate} -> ${outRate}`);
    }
    const { zeroCrossings, rolloff, kaiserBeta } = { ...DEFAULTS, ...options };
    this.inRate = inRate;
    this.outRate = outRate;
    const divisor = gcd(inRate, outRate);
    /** Output samples per `down` input samples. */
    this.up = outRate / divisor;
    this.down = inRate / divisor;
    this.passthrough = this.up === this.down;

    // Cut-off in cycles per input sample, relative to the input rate's Nyquist (1.0 = inRate / 2).
    this.cutoff = rolloff * Math.min(1, this.up / this.down);
    this.kaiserBeta = kaiserBeta;
    const halfWidth = this.passthrough ? 0 : zeroCrossings / this.cutoff; // in input samples
    /** Input samples on each side of an output's position that its kernel reaches. */
    this.halfTaps = Math.ceil(halfWidth);
    this.halfWidth = halfWidth;
    this.tapsPerPhase = 2 * this.halfTaps;
    // Phases are computed on first use: 44100 -> 16000 has 160 of them, a strange rate pair could have
    // thousands, of which a short stream touches few.
    this.phases = new Array(this.up);
    this.i0Beta = besselI0(kaiserBeta);
    /**
     * Latency in input samples: an output is emitted once the input `halfTaps` samples after its position
     * has arrived (the kernel itself is zero-phase about that position).
     */
    this.delayInputSamples = this.passthrough ? 0 : this.halfTaps;
    this.reset();
  }

  /** Forget all history, as if newly built. */
  reset() {
    // History holds inputs from (nextIndex - halfTaps + 1) onwards; it starts as halfTaps - 1 zeros so that
    // the first output (at input position 0) sees silence before the stream.
    const initial = Math.max(0, this.halfTaps - 1);
    this.history = new Float32Array(Math.max(1024, 4 * this.tapsPerPhase));
    this.historyLength = initial;
    /** Absolute input index of history[0]. */
    this.historyStart = -initial;
    /** Position of the next output sample: input index + phase / up. */
    this.nextIndex = 0;
    this.nextPhase = 0;
    this.inputCount = 0;
    this.outputCount = 0;
  }

  /** Kernel coefficients for a fractional offset phase / up, normalised to unit DC gain. */
  phaseCoefficients(phase) {
    let coefficients = this.phases[phase];
    if (coefficients !== undefined) return coefficients;
    coefficients = new Float32Array(this.tapsPerPhase);
    const fraction = phase / this.up;
    let sum = 0;
    for (let k = 0; k < this.tapsPerPhase; k++) {
      // Tap k multiplies input (index - halfTaps + 1 + k); its distance from the output position is:
      const distance = fraction + this.halfTaps - 1 - k;
      const value = this.kernel(distance);
      coefficients[k] = value;
      sum += value;
    }
    // Exact unit gain at every phase: otherwise the gain would ripple with the phase pattern and modulate
    // a steady signal.
    for (let k = 0; k < this.tapsPerPhase; k++) coefficients[k] /= sum;
    this.phases[phase] = coefficients;
    return coefficients;
  }

  /** Windowed sinc at `distance` input samples from the centre. */
  kernel(distance) {
    const ratio = distance / this.halfWidth;
    if (ratio <= -1 || ratio >= 1) return 0;
    const window = besselI0(this.kaiserBeta * Math.sqrt(1 - ratio * ratio)) / this.i0Beta;
    const x = Math.PI * this.cutoff * distance;
    const sinc = x === 0 ? 1 : Math.sin(x) / x;
    return this.cutoff * sinc * window;
  }

  /** An upper bound on the outputs that `inputLength` more inputs can produce, to size output buffers. */
  maxOutput(inputLength) {
    return Math.ceil(((inputLength + 1) * this.up) / this.down) + 1;
  }

  /**
   * Consume `input` and write the outputs it completes into `output` (from index 0).
   * Allocation-free once the history buffer has grown to the largest chunk size seen.
   * @param {Float32Array} input
   * @param {Float32Array} output at least maxOutput(input.length) long
   * @returns {number} the number of output samples written
   */
  process(input, output) {
    this.inputCount += input.length;
    if (this.passthrough) {
      output.set(input);
      this.outputCount += input.length;
      return input.length;
    }
    this.appendHistory(input);
    const { up, down, halfTaps, tapsPerPhase } = this;
    const history = this.history;
    const historyEnd = this.historyStart + this.historyLength; // one past the last input held
    let index = this.nextIndex;
    let phase = this.nextPhase;
    let written = 0;
    // An output at `index` needs inputs up to index + halfTaps.
    while (index + halfTaps < historyEnd) {
      const coefficients = this.phaseCoefficients(phase);
      const first = index - halfTaps + 1 - this.historyStart;
      let acc = 0;
      for (let k = 0; k < tapsPerPhase; k++) acc += history[first + k] * coefficients[k];
      output[written++] = acc;
      phase += down;
      while (phase >= up) {
        phase -= up;
        index++;
      }
    }
    this.nextIndex = index;
    this.nextPhase = phase;
    this.outputCount += written;
    this.discardHistoryBefore(index - halfTaps + 1);
    return written;
  }

  /** Convenience for tests and one-off use: process a chunk into a new array of the exact length. */
  resample(input) {
    const output = new Float32Array(this.maxOutput(input.length));
    const written = this.process(input, output);
    return output.slice(0, written);
  }

  appendHistory(input) {
    const needed = this.historyLength + input.length;
    if (needed > this.history.length) {
      const grown = new Float32Array(Math.max(needed, 2 * this.history.length));
      grown.set(this.history.subarray(0, this.historyLength));
      this.history = grown;
    }
    this.history.set(input, this.historyLength);
    this.historyLength = needed;
  }

  discardHistoryBefore(absoluteIndex) {
    const drop = absoluteIndex - this.historyStart;
    if (drop <= 0) return;
    this.history.copyWithin(0, drop, this.historyLength);
    this.historyLength -= drop;
    this.historyStart = absoluteIndex;
  }
}
