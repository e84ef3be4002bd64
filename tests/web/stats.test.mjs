import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { JitterBuffer } from '../../web/lib/jitter.js';
import { RttTracker } from '../../web/lib/latency.js';
import {
  ClientStatsReporter,
  QUALITY_WARNINGS,
  clientStatsMessage,
  readQuality,
} from '../../web/lib/stats.js';

const RATE = 24000;
const FRAME = 480; // 20 ms at 24 kHz
const QUANTUM = 128;

/** Push `frames` 20 ms frames, then pull `ms` of render quanta. */
function run(jitter, frames, ms) {
  for (let i = 0; i < frames; i++) jitter.push(new Float32Array(FRAME).fill(0.1));
  const out = new Float32Array(QUANTUM);
  for (let pulled = 0; pulled < (ms * RATE) / 1000; pulled += QUANTUM) jitter.pull(out);
}

describe('client_stats', () => {
  test('counts underruns and concealed silence from the real jitter buffer, since the session began', () => {
    const jitter = new JitterBuffer(RATE);
    run(jitter, 5, 200); // 100 ms of audio, 200 ms pulled: one underrun, ~100 ms concealed
    const reporter = new ClientStatsReporter();
    assert.equal(reporter.poll(0, jitter.stats(), null), null, 'no session yet');
    const early = jitter.stats();
    assert.equal(early.underruns, 1);
    assert.ok(early.concealedMs > 80 && early.concealedMs < 110, `${early.concealedMs}`);

    reporter.startSession(jitter.stats(), 1000); // a new session: what came before is not its
    run(jitter, 10, 100);
    assert.equal(reporter.poll(1500, jitter.stats(), 12), null, 'not due within the second');
    run(jitter, 2, 200); // runs dry again
    const rtt = new RttTracker();
    rtt.record(100, 131.5);
    const message = JSON.parse(reporter.poll(2000, jitter.stats(), rtt.lastMs));
    assert.equal(message.type, 'client_stats');
    assert.equal(message.underruns, 1);
    assert.ok(message.concealed_ms > 50 && message.concealed_ms < 200, `${message.concealed_ms}`);
    assert.equal(message.late_frames, 0);
    assert.ok(message.playout_delay_ms >= 0);
    assert.equal(message.rtt_ms, 31.5);
    assert.equal(reporter.poll(2500, jitter.stats(), null), null);
    assert.notEqual(reporter.poll(3000, jitter.stats(), null), null, 'once a second');
    reporter.stopSession();
    assert.equal(reporter.poll(9000, jitter.stats(), null), null);
  });

  test('audio thrown away on overflow counts as late frames', () => {
    const jitter = new JitterBuffer(RATE);
    const reporter = new ClientStatsReporter();
    reporter.startSession(jitter.stats(), 0);
    run(jitter, 30, 0); // 600 ms at once: over the 320 ms capacity
    const message = JSON.parse(reporter.poll(1000, jitter.stats(), null));
    assert.equal(message.late_frames, Math.round(jitter.droppedMs / 20));
    assert.ok(message.late_frames >= 13);
  });

  test('every field stays within what the server accepts', () => {
    const message = JSON.parse(
      clientStatsMessage({
        underruns: -3,
        concealedMs: Number.NaN,
        lateFrames: 2.7,
        playoutDelayMs: 1e9,
        rttMs: Number.POSITIVE_INFINITY,
      }),
    );
    assert.deepEqual(message, {
      type: 'client_stats',
      underruns: 0,
      concealed_ms: 0,
      late_frames: 2,
      playout_delay_ms: 600000,
    });
  });
});

describe('the quality of a latency message', () => {
  test('is read field by field', () => {
    const quality = readQuality({
      type: 'latency',
      quality: {
        level_dbfs: -31.5,
        peak_dbfs: -6,
        clipped_pct: 0,
        snr_db: null,
        input_loss_pct: 1.25,
        output_dropped: 3,
        spikes: 1,
        warnings: ['noisy', 'something_new', 'playback_gaps'],
      },
    });
    assert.deepEqual(quality, {
      levelDbfs: -31.5,
      peakDbfs: -6,
      clippedPct: 0,
      snrDb: null,
      inputLossPct: 1.25,
      outputDropped: 3,
      spikes: 1,
      warnings: ['noisy', 'playback_gaps'],
    });
    assert.equal(readQuality({ type: 'latency' }), null);
    assert.equal(readQuality({ quality: 'loud' }), null);
    assert.equal(readQuality({ quality: { level_dbfs: 'x', warnings: 'clipping' } }).levelDbfs, null);
    assert.deepEqual(readQuality({ quality: { warnings: 'clipping' } }).warnings, []);
    assert.equal(QUALITY_WARNINGS.length, 7);
  });
});
