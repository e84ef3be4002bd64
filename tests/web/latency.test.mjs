import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  MODEL_ALGORITHMIC_MS,
  MODEL_FRAME_MS,
  RttTracker,
  estimateMouthToEar,
  formatEstimate,
  formatTotal,
  modelLatencyMs,
} from '../../web/lib/latency.js';

describe('mouth-to-ear estimate', () => {
  test('adds capture, one round trip, server, the 160 ms model latency, buffer and output', () => {
    const estimate = estimateMouthToEar({
      captureBaseLatencyMs: 10,
      captureResamplerMs: 1,
      rttMs: 40,
      serverMs: 12,
      playbackBufferMs: 25,
      outputBaseLatencyMs: 5,
      outputLatencyMs: 15,
    });
    assert.equal(MODEL_ALGORITHMIC_MS, 160);
    assert.equal(estimate.complete, true);
    // No 20 ms for the capture frame: it fills within the model's 80 ms block (measured, bench/RESULTS.md).
    assert.equal(estimate.totalMs, 10 + 1 + 40 + 12 + 160 + 25 + 5 + 15);
    const byKey = Object.fromEntries(estimate.parts.map((p) => [p.key, p.ms]));
    assert.deepEqual(byKey, { capture: 11, network: 40, server: 12, model: 160, playback: 25, output: 20 });
    assert.equal(formatEstimate(estimate), '11 + 40 + 12 + 160 + 25 + 20 = 268 ms');
    assert.equal(formatTotal(estimate), '≈ 268 ms');
  });

  test('the loopback engine has the 80 ms block and no acoustic delay', () => {
    assert.equal(modelLatencyMs('loopback'), MODEL_FRAME_MS);
    assert.equal(MODEL_FRAME_MS, 80);
    assert.equal(modelLatencyMs('demo'), MODEL_ALGORITHMIC_MS);
    assert.equal(modelLatencyMs(undefined), MODEL_ALGORITHMIC_MS);
    const estimate = estimateMouthToEar({ rttMs: 2, serverMs: 1, playbackBufferMs: 16, modelMs: 80 });
    assert.equal(estimate.totalMs, 2 + 1 + 80 + 16);
  });

  test('unknown parts count as zero and mark the estimate incomplete', () => {
    const estimate = estimateMouthToEar({ playbackBufferMs: 30 });
    assert.equal(estimate.complete, false);
    assert.equal(estimate.totalMs, 160 + 30);
    assert.equal(formatTotal(estimate), '≥ 190 ms');
    // The output device's latency is optional (not every browser reports it).
    const noOutput = estimateMouthToEar({ rttMs: 1, serverMs: 1, playbackBufferMs: 1 });
    assert.equal(noOutput.complete, true);
  });

  test('RttTracker keeps last, smoothed and minimum round trips and ignores nonsense', () => {
    const rtt = new RttTracker(0.5);
    assert.equal(rtt.record(100, 140), 40);
    assert.equal(rtt.record(200, 220), 20);
    assert.equal(rtt.lastMs, 20);
    assert.equal(rtt.smoothedMs, 30);
    assert.equal(rtt.minMs, 20);
    assert.equal(rtt.record(300, 250), null); // from the future: not ours
    assert.equal(rtt.record(undefined, 250), null);
    assert.equal(rtt.samples, 2);
  });
});
