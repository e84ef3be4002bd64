// The mouth-to-ear probe's two halves (web/lib/probe.js) without a browser: the worklet side batches render
// quanta with their times and samples, the page side hands them over as JSON and forgets them. The whole
// path in Chromium is tests/test_mouth_to_ear.py.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { ProbeCollector, ProbeTrace, int16Base64, probeEnabled } from '../../web/lib/probe.js';

/** A stand-in MessagePort that keeps what is posted. */
function fakePort() {
  return { posted: [], postMessage(message) { this.posted.push(message); } };
}

describe('mouth-to-ear probe', () => {
  test('is on only with ?probe=1', () => {
    assert.equal(probeEnabled('https://example.org/?probe=1&autostart=1'), true);
    assert.equal(probeEnabled('https://example.org/'), false);
    assert.equal(probeEnabled('https://example.org/?probe=0'), false);
    assert.equal(probeEnabled('not a url'), false);
  });

  test('a trace posts its quanta in batches, samples in order, with notes between them', () => {
    const port = fakePort();
    const trace = new ProbeTrace(port, 'playback', 24000);
    const quantum = new Float32Array(128);
    let posted = 0;
    for (let call = 0; posted === 0; call++) {
      quantum.fill(call / 1000);
      trace.call(call * 128, quantum, 128, call * 128);
      if (call === 1) trace.note(480);
      posted = port.posted.length;
    }
    const [batch] = port.posted;
    assert.equal(batch.type, 'probe');
    assert.equal(batch.kind, 'playback');
    assert.equal(batch.rate, 24000);
    const calls = batch.walls.length;
    assert.ok(calls > 1);
    assert.deepEqual(Array.from(batch.frames.slice(0, 3)), [0, 128, 256]);
    assert.deepEqual(Array.from(batch.counts), new Array(calls).fill(128));
    assert.equal(batch.samples.length, calls * 128);
    assert.ok(Math.abs(batch.samples[128 * 2] - 0.002) < 1e-7);
    assert.equal(batch.notes.length, 2);
    assert.equal(batch.notes[1], 480);
    for (const wall of batch.walls) assert.ok(Math.abs(wall - Date.now()) < 60_000);
  });

  test('the page side returns everything since the last take, then nothing', () => {
    const port = fakePort();
    const trace = new ProbeTrace(port, 'capture', 16000);
    const quantum = new Float32Array([0.25, -0.25, 1, -1, 2]);
    while (port.posted.length === 0) trace.call(0, quantum, 5);
    const collector = new ProbeCollector();
    collector.add(port.posted[0]);
    collector.sent();
    collector.received();
    const taken = collector.take();
    assert.equal(taken.sends.length, 1);
    assert.equal(taken.receives.length, 1);
    const capture = taken.traces.capture;
    assert.equal(capture.rate, 16000);
    const pcm = new Int16Array(Uint8Array.from(Buffer.from(capture.samples, 'base64')).buffer);
    assert.deepEqual(Array.from(pcm.slice(0, 5)), [8192, -8192, 32767, -32767, 32767]); // clipped
    assert.equal(pcm.length, capture.counts.reduce((a, b) => a + b, 0));
    const again = collector.take();
    assert.equal(again.sends.length, 0);
    assert.equal(Buffer.from(again.traces.capture.samples, 'base64').length, 0);
  });

  test('int16Base64 encodes little-endian int16', () => {
    assert.equal(int16Base64(new Float32Array([0, 1 / 32767])), Buffer.from([0, 0, 1, 0]).toString('base64'));
  });
});
