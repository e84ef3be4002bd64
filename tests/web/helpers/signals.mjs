// Test signals and measurements shared by the web tests.

/** `count` samples of amplitude * sin(2π f t) at `rate`, starting at sample `start`. */
export function sine(rate, frequency, count, amplitude = 0.5, start = 0) {
  const out = new Float32Array(count);
  const step = (2 * Math.PI * frequency) / rate;
  for (let i = 0; i < count; i++) out[i] = amplitude * Math.sin(step * (start + i));
  return out;
}

export function rms(samples, from = 0, to = samples.length) {
  let sum = 0;
  for (let i = from; i < to; i++) sum += samples[i] * samples[i];
  return Math.sqrt(sum / (to - from));
}

/** Concatenate Float32Arrays. */
export function concat(chunks) {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const out = new Float32Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** Deterministic pseudo-random numbers in [0, 1) (mulberry32), so failures reproduce. */
export function seededRandom(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
