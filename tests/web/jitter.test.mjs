import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { JitterBuffer } from '../../web/lib/jitter.js';

const RATE = 48000;
const FRAME = 960; // 20 ms at 48 kHz
const QUANTUM = 128;

/** A frame whose samples count up from `start` (small steps), so order and gaps can be checked. */
function rampFrame(start, length = FRAME) {
  return Float32Array.from({ length }, (_, i) => ((start + i) % 10000) / 10000);
}

/**
 * Simulate a steady network: one frame every 20 ms (arriving `lateMs(k)` ms late), and the audio device
 * pulling 128-sample quanta on time. Returns per-quantum depths.
 */
function simulate(buffer, seconds, { lateMs = () => 0, startFrame = 0 } = {}) {
  const quanta = Math.floor((seconds * RATE) / QUANTUM);
  const out = new Float32Array(QUANTUM);
  const depths = [];
  let nextFrame = startFrame;
  const firstQuantumTime = (startFrame * FRAME) / RATE;
  for (let q = 0; q < quanta; q++) {
    const now = firstQuantumTime + (q * QUANTUM) / RATE;
    while ((nextFrame * FRAME) / RATE + lateMs(nextFrame) / 1000 <= now) {
      buffer.push(rampFrame(nextFrame * FRAME));
      nextFrame++;
    }
    buffer.pull(out);
    depths.push(buffer.depthMs);
  }
  return depths;
}

describe('JitterBuffer', () => {
  test('waits for its start target (one frame + 10 ms) before playing', () => {
    const buffer = new JitterBuffer(RATE);
    assert.equal(buffer.targetMs, 30);
    const out = new Float32Array(QUANTUM);
    buffer.push(rampFrame(0));
    buffer.pull(out);
    assert.equal(buffer.playing, false);
    assert.ok(out.every((s) => s === 0), 'played before reaching the target');
    assert.equal(buffer.depthMs, 20);
    buffer.push(rampFrame(FRAME));
    buffer.pull(out);
    assert.equal(buffer.playing, true);
    assert.deepEqual(out, rampFrame(0, QUANTUM));
    assert.equal(buffer.underruns, 0);
  });

  test('plays samples in order, across the ring wrapping around, at rate 1', () => {
    // Catching up is off here: it would (rightly) interpolate, since this test keeps the depth high.
    const buffer = new JitterBuffer(RATE, { catchUpRate: 1, fastCatchUpRate: 1 });
    const played = [];
    const out = new Float32Array(QUANTUM);
    let pushed = 0;
    // Keep depth between 1 and 3 frames for many ring lengths.
    for (let q = 0; q < 2000; q++) {
      while (buffer.depthMs < 40) {
        buffer.push(rampFrame(pushed * FRAME));
        pushed++;
      }
      buffer.pull(out);
      played.push(...out);
    }
    assert.equal(buffer.underruns, 0);
    for (let i = 0; i < played.length; i++) assert.equal(played[i], Math.fround((i % 10000) / 10000));
  });

  test('counts an underrun once, raises the target, and rebuffers to it', () => {
    const buffer = new JitterBuffer(RATE);
    const out = new Float32Array(QUANTUM);
    buffer.push(rampFrame(0));
    buffer.push(rampFrame(FRAME));
    // 40 ms buffered = 15 quanta; the 16th runs dry part-way.
    for (let q = 0; q < 15; q++) buffer.pull(out);
    assert.equal(buffer.underruns, 0);
    buffer.pull(out);
    assert.equal(buffer.underruns, 1);
    assert.equal(buffer.targetMs, 50);
    assert.equal(buffer.playing, false);
    // The tail of the quantum after the last sample is silence.
    assert.equal(out[QUANTUM - 1], 0);
    // Starving longer is the same underrun, not new ones.
    for (let q = 0; q < 10; q++) buffer.pull(out);
    assert.equal(buffer.underruns, 1);
    // Two frames (40 ms) are below the new 50 ms target; three are enough.
    buffer.push(rampFrame(0));
    buffer.push(rampFrame(FRAME));
    buffer.pull(out);
    assert.equal(buffer.playing, false);
    buffer.push(rampFrame(2 * FRAME));
    buffer.pull(out);
    assert.equal(buffer.playing, true);
  });

  test('the target never exceeds its maximum, and the depth never exceeds capacity', () => {
    const buffer = new JitterBuffer(RATE, { maxTargetMs: 120 });
    const out = new Float32Array(QUANTUM);
    for (let round = 0; round < 20; round++) {
      while (!buffer.playing) {
        buffer.push(rampFrame(0));
        buffer.pull(out);
      }
      while (buffer.playing) buffer.pull(out); // drain: an underrun
    }
    assert.equal(buffer.underruns, 20);
    assert.equal(buffer.targetMs, 120);
    // A burst of 2 s of audio (a stalled tab catching up) is cut to capacity, oldest first.
    for (let f = 0; f < 100; f++) buffer.push(rampFrame(f * FRAME));
    assert.equal(buffer.depthMs, buffer.capacityMs);
    assert.ok(buffer.capacityMs <= 120 + 120);
    assert.equal(buffer.droppedMs, 2000 - buffer.capacityMs);
    buffer.pull(out);
    // What is left is the newest audio: it ends with frame 99's last sample.
    const newestStart = (100 * FRAME - buffer.capacityMs * 48) % 10000;
    assert.equal(out[0], Math.fround(newestStart / 10000));
  });

  test('after an underrun the target shrinks back once the network has been steady', () => {
    const buffer = new JitterBuffer(RATE, { steadyMsBeforeShrink: 2000, shrinkStepMs: 10 });
    // One 45 ms hiccup on frame 50 (at 1 s), then a perfectly steady stream.
    const lateMs = (k) => (k === 50 ? 45 : 0);
    simulate(buffer, 1.5, { lateMs });
    assert.equal(buffer.underruns, 1);
    const grownTo = buffer.targetMs;
    assert.ok(grownTo >= 50, `target after the hiccup ${grownTo}`);
    const depths = simulate(buffer, 14.5, { lateMs, startFrame: 75 });
    assert.equal(buffer.underruns, 1);
    // One 10 ms step per 2 s steady: back at the 30 ms minimum well within 14 s.
    assert.equal(buffer.targetMs, 30);
    // The extra buffered audio was played out (gently faster), not kept as extra delay: at the end the
    // depth dips to about one 10 ms margin before each frame lands.
    const lastSecond = depths.slice(-Math.floor(RATE / QUANTUM));
    const lowest = Math.min(...lastSecond);
    assert.ok(lowest <= 10 + 5 + 128 / 48, `lowest depth in the last second ${lowest} ms`);
    assert.ok(lowest >= 0);
  });

  test('absorbs steady jitter below the margin with no underrun', () => {
    const buffer = new JitterBuffer(RATE);
    // Frames arrive up to 8 ms late, pseudo-randomly.
    simulate(buffer, 10, { lateMs: (k) => (k * 7919) % 9 });
    assert.equal(buffer.underruns, 0);
    assert.equal(buffer.targetMs, 30);
  });

  test('under heavy jitter the target grows until underruns stop', () => {
    const buffer = new JitterBuffer(RATE);
    // From frame 25 on, every 25th frame (each 0.5 s) is 70 ms late; the frames behind it queue up.
    const lateMs = (k) => (k > 0 && k % 25 === 0 ? 70 : 0);
    simulate(buffer, 10, { lateMs });
    const underrunsAfterWarmUp = buffer.underruns;
    assert.ok(underrunsAfterWarmUp >= 1 && underrunsAfterWarmUp <= 4, `${underrunsAfterWarmUp} underruns`);
    assert.ok(buffer.targetMs >= 70 && buffer.targetMs <= 110, `target ${buffer.targetMs}`);
    simulate(buffer, 20, { lateMs, startFrame: 500 });
    assert.equal(buffer.underruns, underrunsAfterWarmUp, 'kept underrunning at a grown target');
  });

  test('rare late bursts do not make it shrink back into the next underrun', () => {
    const buffer = new JitterBuffer(RATE, { steadyMsBeforeShrink: 3000 });
    // A 60 ms late burst every 4 s: longer apart than the steady period that allows shrinking.
    const lateMs = (k) => (k > 0 && k % 200 === 0 ? 60 : 0);
    simulate(buffer, 40, { lateMs });
    // The first burst grows the target by its size; a shrink soon followed by an underrun doubles the
    // steady time needed before the next; after that the dips the bursts cause keep it from shrinking.
    assert.ok(buffer.underruns <= 2, `${buffer.underruns} underruns in 40 s`);
    assert.ok(buffer.targetMs >= 70, `target ${buffer.targetMs}`);
    assert.ok(buffer.holdMs > 3000, `hold ${buffer.holdMs}`);
  });

  test('a long outage (e.g. a reconnect) raises the target by one step only', () => {
    const buffer = new JitterBuffer(RATE);
    const out = new Float32Array(QUANTUM);
    buffer.push(rampFrame(0));
    buffer.push(rampFrame(FRAME));
    for (let q = 0; q < 16; q++) buffer.pull(out);
    assert.equal(buffer.underruns, 1);
    for (let q = 0; q < 750; q++) buffer.pull(out); // 2 s without audio
    for (let f = 0; f < 3; f++) buffer.push(rampFrame(f * FRAME));
    buffer.pull(out);
    assert.equal(buffer.targetMs, 50);
    assert.equal(buffer.underruns, 1);
  });

  test('a burst of extra audio is played out slightly fast, not kept as delay', () => {
    const buffer = new JitterBuffer(RATE);
    let extraPushed = false;
    const out = new Float32Array(QUANTUM);
    const depths = [];
    let maxRate = 1;
    let nextFrame = 0;
    for (let q = 0; q < (8 * RATE) / QUANTUM; q++) {
      const now = (q * QUANTUM) / RATE;
      while ((nextFrame * FRAME) / RATE <= now) buffer.push(rampFrame(nextFrame++ * FRAME));
      if (!extraPushed && now >= 2) {
        // 100 ms arrive all at once on top of the steady stream.
        for (let f = 0; f < 5; f++) buffer.push(rampFrame(0));
        extraPushed = true;
      }
      buffer.pull(out);
      depths.push(buffer.depthMs);
      maxRate = Math.max(maxRate, buffer.rate);
    }
    assert.equal(buffer.underruns, 0);
    assert.equal(buffer.droppedMs, 0);
    assert.ok(maxRate > 1 && maxRate <= 1.05, `rate ${maxRate}`);
    const perSecond = RATE / QUANTUM;
    const peak = Math.max(...depths.slice(2 * perSecond, 3 * perSecond));
    const lastSecondMax = Math.max(...depths.slice(-perSecond));
    assert.ok(peak > 100, `peak ${peak}`);
    // Back to one frame + margin (plus a quantum of granularity) within 6 s at 2-5 % speed.
    assert.ok(lastSecondMax <= 30 + 128 / 48 + 5, `depth still up to ${lastSecondMax} ms`);
  });

  test('counts frames played', () => {
    const buffer = new JitterBuffer(RATE);
    const out = new Float32Array(QUANTUM);
    for (let f = 0; f < 10; f++) buffer.push(rampFrame(f * FRAME));
    while (buffer.underruns === 0) buffer.pull(out);
    assert.equal(buffer.framesPlayed, 10);
    assert.equal(buffer.stats().framesPlayed, 10);
  });

  test('works at 24 kHz with 480-sample frames, and reset() starts over', () => {
    const buffer = new JitterBuffer(24000);
    const out = new Float32Array(QUANTUM);
    buffer.push(new Float32Array(480).fill(0.25));
    buffer.push(new Float32Array(480).fill(0.25));
    buffer.pull(out);
    assert.ok(out.every((s) => s === 0.25));
    assert.ok(Math.abs(buffer.depthMs - (40 - (QUANTUM / 24000) * 1000)) < 1e-9);
    buffer.reset();
    assert.equal(buffer.depthMs, 0);
    assert.equal(buffer.framesPlayed, 0);
    assert.equal(buffer.targetMs, 30);
  });
});
