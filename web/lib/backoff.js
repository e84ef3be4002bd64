// Reconnection delays: exponential back-off with jitter, capped.
//
// The first retry comes quickly (a server restart or a dropped Wi-Fi packet usually heals in under a
// second); later ones slow down so that a server that is down or full is not hammered, and jitter keeps
// many clients that lost the same server from reconnecting in lock-step.

export const BACKOFF_DEFAULTS = Object.freeze({
  initialMs: 500,
  factor: 2,
  maxMs: 10000,
  // Each delay is scaled by a random factor in [1 - jitter, 1 + jitter] and then capped at maxMs.
  jitter: 0.25,
});

// Retries of a resume (lib/connection.js), after the first, which goes at once: the server keeps a dropped
// session only for its resume window (10 s by default) and the conversation should go on within 2 s of the
// network coming back, so these stay short and flat (a retry at least every 0.6 s: a failed try into a
// network that is down costs a SYN). Jitter still spreads the pages that lost the same link; a drop the
// server decided on is never retried at this pace.
export const RESUME_BACKOFF = Object.freeze({
  initialMs: 250,
  factor: 1.5,
  maxMs: 500,
  jitter: 0.25,
});

/**
 * The delay before retry number `attempt` (0-based).
 * @param {number} attempt
 * @param {Partial<typeof BACKOFF_DEFAULTS>} [options]
 * @param {number} [random] a number in [0, 1); 0.5 gives the un-jittered delay
 */
export function backoffDelay(attempt, options = {}, random = Math.random()) {
  const { initialMs, factor, maxMs, jitter } = { ...BACKOFF_DEFAULTS, ...options };
  const base = Math.min(maxMs, initialMs * factor ** Math.max(0, attempt));
  const scaled = base * (1 + jitter * (2 * random - 1));
  return Math.round(Math.min(maxMs, Math.max(0, scaled)));
}

/** Stateful helper: `next()` gives successive delays, `reset()` after a connection proves healthy. */
export class Backoff {
  /**
   * @param {Partial<typeof BACKOFF_DEFAULTS>} [options]
   * @param {() => number} [random] source of numbers in [0, 1)
   */
  constructor(options = {}, random = Math.random) {
    this.options = { ...BACKOFF_DEFAULTS, ...options };
    this.random = random;
    this.attempt = 0;
  }

  next() {
    return backoffDelay(this.attempt++, this.options, this.random());
  }

  reset() {
    this.attempt = 0;
  }
}
