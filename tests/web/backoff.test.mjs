import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { BACKOFF_DEFAULTS, Backoff, backoffDelay } from '../../web/lib/backoff.js';
import { seededRandom } from './helpers/signals.mjs';

describe('backoff', () => {
  test('without jitter the delays double from 500 ms up to the 10 s cap', () => {
    const delays = Array.from({ length: 8 }, (_, attempt) => backoffDelay(attempt, {}, 0.5));
    assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
  });

  test('jitter spreads each delay by ±25 % and never passes the cap', () => {
    assert.equal(backoffDelay(0, {}, 0), 375);
    assert.equal(backoffDelay(0, {}, 0.999999), 625);
    assert.equal(backoffDelay(3, {}, 0), 3000);
    for (let attempt = 0; attempt < 30; attempt++) {
      for (const r of [0, 0.25, 0.5, 0.75, 0.999999]) {
        assert.ok(backoffDelay(attempt, {}, r) <= BACKOFF_DEFAULTS.maxMs);
      }
    }
    assert.ok(backoffDelay(10, {}, 0) >= 7500);
  });

  test('the first retry always comes within a second', () => {
    const random = seededRandom(1);
    for (let i = 0; i < 1000; i++) assert.ok(backoffDelay(0, {}, random()) <= 1000);
  });

  test('Backoff walks the sequence, with jitter, and reset() starts it over', () => {
    const backoff = new Backoff({}, seededRandom(42));
    const delays = Array.from({ length: 7 }, () => backoff.next());
    const bases = [500, 1000, 2000, 4000, 8000, 10000, 10000];
    delays.forEach((delay, i) => {
      assert.ok(delay >= bases[i] * 0.75 && delay <= Math.min(10000, bases[i] * 1.25), `${i}: ${delay}`);
    });
    // Jitter is really applied: the seeded sequence is not the bare one.
    assert.notDeepEqual(delays, bases);
    backoff.reset();
    assert.ok(backoff.next() <= 625);
  });

  test('options override the defaults', () => {
    const delays = Array.from({ length: 4 }, (_, a) => backoffDelay(a, { initialMs: 100, maxMs: 300 }, 0.5));
    assert.deepEqual(delays, [100, 200, 300, 300]);
  });
});
