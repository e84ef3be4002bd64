import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { StreamingResampler, gcd } from '../../web/lib/resampler.js';
import { concat, rms, seededRandom, sine } from './helpers/signals.mjs';

const RENDER_QUANTUM = 128;

/** Feed `input` in chunks of `chunk` samples, as an AudioWorklet would; returns all outputs. */
function runChunked(resampler, input, chunk) {
  const out = [];
  for (let i = 0; i < input.length; i += chunk) out.push(resampler.resample(input.subarray(i, i + chunk)));
  return concat(out);
}

/** Largest difference between the output and the ideal band-limited sine at the output rate. */
function maxErrorAgainstIdeal(output, inRate, outRate, frequency, amplitude, skip) {
  let worst = 0;
  for (let n = skip; n < output.length; n++) {
    const ideal = amplitude * Math.sin((2 * Math.PI * frequency * n) / outRate);
    worst = Math.max(worst, Math.abs(output[n] - ideal));
  }
  return worst;
}

describe('StreamingResampler', () => {
  test('reduces the rate ratio to lowest terms', () => {
    assert.equal(gcd(44100, 16000), 100);
    const r = new StreamingResampler(44100, 16000);
    assert.deepEqual([r.up, r.down], [160, 441]);
    const p = new StreamingResampler(24000, 44100);
    assert.deepEqual([p.up, p.down], [147, 80]);
  });

  test('rejects rates that are not positive integers', () => {
    assert.throws(() => new StreamingResampler(0, 16000), RangeError);
    assert.throws(() => new StreamingResampler(44100.5, 16000), RangeError);
  });

  for (const inRate of [48000, 44100]) {
    test(`${inRate} -> 16000 gives exactly 320 samples per 20 ms, with no drift over 60 s`, () => {
      const r = new StreamingResampler(inRate, 16000);
      const frameIn = (inRate * 20) / 1000;
      const outBuffer = new Float32Array(r.maxOutput(frameIn));
      const perFrame = [];
      const signal = sine(inRate, 440, frameIn);
      for (let f = 0; f < 3000; f++) perFrame.push(r.process(signal, outBuffer));
      // The first frame is short by the filter's look-ahead; from then on every frame gives exactly 320.
      assert.ok(perFrame[0] < 320 && perFrame[0] > 300, `first frame gave ${perFrame[0]}`);
      assert.ok(perFrame.slice(1).every((n) => n === 320), 'a later frame did not give 320');
      assert.equal(r.outputCount, 3000 * 320 - (320 - perFrame[0]));
    });

    test(`${inRate} -> 16000 in 128-sample render quanta tracks the exact ratio at all times`, () => {
      const r = new StreamingResampler(inRate, 16000);
      const out = new Float32Array(r.maxOutput(RENDER_QUANTUM));
      const quantum = sine(inRate, 440, RENDER_QUANTUM);
      const lagAfter = [];
      for (let q = 1; q <= 20000; q++) {
        r.process(quantum, out);
        const exact = (r.inputCount * 16000) / inRate;
        const lag = exact - r.outputCount;
        // Never ahead of the input, never behind by more than the filter's look-ahead (+1 for rounding).
        const lookAhead = (r.delayInputSamples * 16000) / inRate;
        assert.ok(lag >= 0 && lag <= lookAhead + 1, `lag ${lag} at quantum ${q}`);
        if (q % 5000 === 0) lagAfter.push(lag);
      }
      // The lag does not grow: after ~53 s it is within one sample of what it was after ~13 s.
      assert.ok(Math.abs(lagAfter.at(-1) - lagAfter[0]) <= 1, `lag drifted: ${lagAfter}`);
    });

    test(`${inRate} -> 16000 keeps a 1 kHz sine's frequency, phase and amplitude`, () => {
      const r = new StreamingResampler(inRate, 16000);
      const input = sine(inRate, 1000, inRate); // 1 s
      const output = runChunked(r, input, RENDER_QUANTUM);
      const skip = 64; // the start sees the silence before the stream through the filter
      const error = maxErrorAgainstIdeal(output, inRate, 16000, 1000, 0.5, skip);
      assert.ok(error < 1e-3, `max error ${error}`);
      const gainDb = 20 * Math.log10(rms(output, skip) / (0.5 / Math.SQRT2));
      assert.ok(Math.abs(gainDb) < 0.05, `gain ${gainDb} dB`);
    });

    test(`${inRate} -> 16000 attenuates tones above 8 kHz instead of aliasing them`, () => {
      for (const frequency of [9000, 10000, 15000]) {
        const r = new StreamingResampler(inRate, 16000);
        const output = r.resample(sine(inRate, frequency, inRate / 2, 0.5));
        const attenuationDb = 20 * Math.log10(rms(output, 200) / (0.5 / Math.SQRT2));
        assert.ok(attenuationDb < -60, `${frequency} Hz only ${attenuationDb.toFixed(1)} dB down`);
      }
      // Naive decimation (every third sample) would alias 10 kHz to 6 kHz at full amplitude.
      const naive = sine(48000, 10000, 48000 / 2).filter((_, i) => i % 3 === 0);
      assert.ok(rms(naive) > 0.3);
    });

    test(`${inRate} -> 16000 chunk by chunk equals the whole signal at once`, () => {
      const random = seededRandom(7);
      const input = Float32Array.from({ length: inRate / 2 }, () => 2 * random() - 1);
      const whole = new StreamingResampler(inRate, 16000).resample(input);
      const chunked = new StreamingResampler(inRate, 16000);
      const pieces = [];
      for (let i = 0; i < input.length; ) {
        const size = 1 + Math.floor(random() * 700);
        pieces.push(chunked.resample(input.subarray(i, i + size)));
        i += size;
      }
      assert.deepEqual(concat(pieces), whole);
    });
  }

  for (const outRate of [48000, 44100]) {
    test(`24000 -> ${outRate} playback path: exact frame sizes and a clean 1 kHz sine`, () => {
      const r = new StreamingResampler(24000, outRate);
      const frameOut = (outRate * 20) / 1000;
      const input = sine(24000, 1000, 24000);
      const counts = [];
      const out = [];
      for (let i = 0; i < input.length; i += 480) {
        const chunk = r.resample(input.subarray(i, i + 480));
        counts.push(chunk.length);
        out.push(chunk);
      }
      assert.ok(counts.slice(1).every((n) => n === frameOut), `frame sizes ${[...new Set(counts)]}`);
      const output = concat(out);
      const error = maxErrorAgainstIdeal(output, 24000, outRate, 1000, 0.5, 100);
      assert.ok(error < 1e-3, `max error ${error}`);
    });
  }

  test('upsampling 24000 -> 48000 leaves no image of the 11 kHz tone at 13 kHz', () => {
    const r = new StreamingResampler(24000, 48000);
    const output = r.resample(sine(24000, 11000, 24000));
    // Project onto 13 kHz (the image of 11 kHz around 12 kHz) and onto 11 kHz.
    const amplitudeAt = (frequency) => {
      let re = 0;
      let im = 0;
      for (let n = 200; n < output.length; n++) {
        re += output[n] * Math.cos((2 * Math.PI * frequency * n) / 48000);
        im += output[n] * Math.sin((2 * Math.PI * frequency * n) / 48000);
      }
      return (2 * Math.hypot(re, im)) / (output.length - 200);
    };
    assert.ok(amplitudeAt(13000) < 1e-3, `image ${amplitudeAt(13000)}`);
    // 11 kHz is 0.92 of the input Nyquist, inside the transition band: passed, if somewhat attenuated.
    assert.ok(amplitudeAt(11000) > 0.1);
  });

  test('equal rates pass samples through unchanged', () => {
    const r = new StreamingResampler(16000, 16000);
    const input = sine(16000, 1000, 320);
    assert.deepEqual(r.resample(input), input);
    assert.equal(r.delayInputSamples, 0);
  });

  test('reset() makes it behave as new', () => {
    const input = sine(48000, 1000, 4800);
    const r = new StreamingResampler(48000, 16000);
    const first = r.resample(input);
    r.resample(input);
    r.reset();
    assert.deepEqual(r.resample(input), first);
  });

  test('is fast enough for a render thread (44.1 kHz, 10 s of audio well under 1 s of CPU)', () => {
    const r = new StreamingResampler(44100, 16000);
    const quantum = sine(44100, 1000, RENDER_QUANTUM);
    const out = new Float32Array(r.maxOutput(RENDER_QUANTUM));
    const started = process.cpuUsage();
    for (let i = 0; i < (44100 * 10) / RENDER_QUANTUM; i++) r.process(quantum, out);
    const used = process.cpuUsage(started);
    const elapsed = (used.user + used.system) / 1000; // this process's CPU, not the wall clock
    assert.ok(elapsed < 1000, `${elapsed} ms`);
  });
});
