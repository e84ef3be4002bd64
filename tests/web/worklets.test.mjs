// The two AudioWorklet processors, run in Node inside a minimal stand-in for AudioWorkletGlobalScope
// (registerProcessor, AudioWorkletProcessor with a real MessagePort, the global sampleRate). The DSP they
// wrap is tested on its own; this checks the wrappers: framing, transfer, mixing, stats, resampling path.

import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';

import {
  KIND_CLIENT_AUDIO,
  KIND_SERVER_AUDIO,
  decodeAudioFrame,
  encodeAudioFrame,
} from '../../web/lib/protocol.js';
import { concat, sine } from './helpers/signals.mjs';

const processors = new Map();
const openPorts = [];
globalThis.registerProcessor = (name, processorClass) => processors.set(name, processorClass);
globalThis.AudioWorkletProcessor = class {
  constructor() {
    const channel = new MessageChannel();
    this.port = channel.port1;
    /** The page's end of the node's port. */
    this.pagePort = channel.port2;
    openPorts.push(channel.port1, channel.port2);
  }
};

await import('../../web/worklets/capture.js');
await import('../../web/worklets/playback.js');

/** Build a processor as the browser would for a context running at `rate`. */
function construct(name, rate, processorOptions = {}) {
  globalThis.sampleRate = rate;
  return new (processors.get(name))({ processorOptions });
}

/** Collect messages arriving at `port` until `done(messages)` says enough. */
function collect(port, done) {
  const messages = [];
  return new Promise((resolve) => {
    port.on('message', (data) => {
      messages.push(data);
      if (done(messages)) resolve(messages);
    });
  });
}

after(() => {
  for (const port of openPorts) port.close();
});

describe('capture worklet', () => {
  for (const rate of [48000, 44100]) {
    test(`at ${rate} Hz it posts transferred 641-byte frames of 16 kHz audio`, async () => {
      const processor = construct('capture-processor', rate);
      const audioCount = (messages) => messages.filter((d) => d instanceof ArrayBuffer).length;
      const frames = collect(processor.pagePort, (messages) => audioCount(messages) === 49);
      const input = sine(rate, 1000, rate); // 1 s; the filter's look-ahead keeps back the last frame
      for (let i = 0; i + 128 <= input.length; i += 128) {
        assert.equal(processor.process([[input.subarray(i, i + 128)]], [[new Float32Array(128)]]), true);
      }
      const messages = await frames;
      const info = messages.find((m) => m.type === 'info');
      assert.equal(info.sampleRate, rate);
      assert.ok(info.resamplerDelayMs > 0 && info.resamplerDelayMs < 2, `${info.resamplerDelayMs} ms`);
      const audio = messages.filter((m) => m instanceof ArrayBuffer);
      assert.ok(audio.every((f) => f.byteLength === 641 && new Uint8Array(f)[0] === KIND_CLIENT_AUDIO));
      const samples = concat(audio.map((f) => decodeAudioFrame(f, KIND_CLIENT_AUDIO)));
      let worst = 0;
      for (let n = 64; n < samples.length; n++) {
        worst = Math.max(worst, Math.abs(samples[n] - 0.5 * Math.sin((2 * Math.PI * 1000 * n) / 16000)));
      }
      assert.ok(worst < 2e-3, `max error ${worst}`);
    });
  }

  test('mixes extra channels to mono and stops while paused', async () => {
    const processor = construct('capture-processor', 16000);
    const left = sine(16000, 500, 128, 0.5);
    const right = sine(16000, 500, 128, 0.1);
    const frames = collect(processor.pagePort, (m) => m.filter((d) => d instanceof ArrayBuffer).length === 1);
    for (let q = 0; q < 3; q++) processor.process([[left, right]], [[]]); // 384 samples: one frame
    const frame = (await frames).find((d) => d instanceof ArrayBuffer);
    const samples = decodeAudioFrame(frame, KIND_CLIENT_AUDIO);
    for (let i = 0; i < 128; i++) assert.ok(Math.abs(samples[i] - (left[i] + right[i]) / 2) < 1e-4);

    processor.onControl({ type: 'pause' });
    const framesBefore = processor.assembler.framesEmitted;
    for (let q = 0; q < 10; q++) processor.process([[left]], [[]]);
    assert.equal(processor.assembler.framesEmitted, framesBefore);
    // No input connected (e.g. the track ended): nothing to do, but stay alive.
    processor.onControl({ type: 'resume' });
    assert.equal(processor.process([[]], [[]]), true);
    assert.equal(processor.process([], []), true);
  });
});

describe('playback worklet', () => {
  /** Post frames from the page and resolve once the processor has handled them all. */
  function deliver(processor, frames) {
    const original = processor.port.onmessage;
    let handled = 0;
    return new Promise((resolve) => {
      processor.port.onmessage = (event) => {
        original(event);
        if (++handled === frames.length) {
          processor.port.onmessage = original;
          resolve();
        }
      };
      for (const frame of frames) {
        processor.pagePort.postMessage(frame, frame instanceof ArrayBuffer ? [frame] : []);
      }
    });
  }

  function serverFrames(count) {
    const signal = sine(24000, 1000, 480 * count);
    return Array.from({ length: count }, (_, k) =>
      encodeAudioFrame(signal.subarray(480 * k, 480 * (k + 1)), KIND_SERVER_AUDIO),
    );
  }

  for (const rate of [24000, 48000]) {
    test(`at ${rate} Hz it plays 24 kHz frames through the jitter buffer and reports stats`, async () => {
      const processor = construct('playback-processor', rate, { statsPerSecond: 4 });
      await deliver(processor, serverFrames(10));
      const stats = collect(processor.pagePort, (m) => m.length === 1);
      const played = [];
      for (let q = 0; q < Math.floor((0.25 * rate) / 128) + 1; q++) {
        const left = new Float32Array(128);
        const right = new Float32Array(128);
        assert.equal(processor.process([], [[left, right]]), true);
        assert.deepEqual(right, left);
        played.push(left);
      }
      const [report] = await stats;
      assert.equal(report.type, 'stats');
      assert.equal(report.sampleRate, rate);
      assert.equal(report.framesReceived, 10);
      // 200 ms pushed (less the resampler's look-ahead at 48 kHz), ~250 ms pulled: it ran dry once.
      assert.equal(report.underruns, 1);
      assert.ok(report.framesPlayed >= 9 && report.framesPlayed <= 10, `played ${report.framesPlayed}`);
      const output = concat(played);
      // A clean 1 kHz sine at the output rate (after the first 2 ms, where the resampler meets the
      // stream's abrupt start).
      let worst = 0;
      for (let n = 0.002 * rate; n < 0.18 * rate; n++) {
        worst = Math.max(worst, Math.abs(output[n] - 0.5 * Math.sin((2 * Math.PI * 1000 * n) / rate)));
      }
      assert.ok(worst < 3e-3, `max error ${worst}`);
    });
  }

  test('ignores malformed frames and restarts on reset', async () => {
    const processor = construct('playback-processor', 24000);
    const bad = new Uint8Array(961);
    bad[0] = KIND_CLIENT_AUDIO;
    await deliver(processor, [bad.buffer, new ArrayBuffer(10), ...serverFrames(2)]);
    assert.equal(processor.badFrames, 2);
    assert.equal(processor.framesReceived, 2);
    assert.ok(processor.jitter.depthMs > 39);
    await deliver(processor, [{ type: 'reset' }]);
    assert.equal(processor.jitter.depthMs, 0);
    assert.equal(processor.framesReceived, 0);
  });
});
