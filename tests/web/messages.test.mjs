// The status line's wording for what the server says (web/lib/messages.js).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { drainingMessage, reconnectMessage, sessionEndMessage } from '../../web/lib/messages.js';

test('a drain says how long the conversation may go on', () => {
  assert.match(drainingMessage({ type: 'draining', deadline_s: 29.6 }), /within 30 s/);
  assert.doesNotMatch(drainingMessage({ type: 'draining' }), /within/);
});

test('a full server and a lost connection are told apart', () => {
  assert.match(reconnectMessage({ capacity: true, delayMs: 1500 }, 4), /full \(all 4 sessions are busy\)/);
  assert.match(reconnectMessage({ code: 1006, delayMs: 200 }), /Connection lost \(code 1006\)/);
  assert.match(sessionEndMessage({ reason: 'server_shutdown' }), /server_shutdown/);
});
