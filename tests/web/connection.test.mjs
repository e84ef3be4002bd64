// AgentConnection against a real WebSocket server (helpers/ws_server.mjs) with Node's own WebSocket
// client. Node 20 keeps that client behind --experimental-websocket: without it, this file re-runs itself
// with the flag in a child process.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Backoff } from '../../web/lib/backoff.js';
import { AgentConnection, CLOSE_CLIENT_TIMEOUT } from '../../web/lib/connection.js';
import { encodeAudioFrame, KIND_SERVER_AUDIO } from '../../web/lib/protocol.js';
import { startWsServer } from './helpers/ws_server.mjs';

/** Records the connection's callbacks; `waitFor` resolves on the first matching event, past or future. */
class Recorder {
  constructor() {
    this.events = [];
    this.waiters = [];
  }

  handlers() {
    const names = [
      'onState',
      'onSessionStart',
      'onSessionEnd',
      'onAudio',
      'onLatency',
      'onVad',
      'onTranscript',
      'onServerError',
      'onRtt',
    ];
    return Object.fromEntries(names.map((name) => [name, (...args) => this.record(name, args)]));
  }

  record(name, args) {
    const event = { name, args };
    this.events.push(event);
    this.waiters = this.waiters.filter((w) => !(w.predicate(event) && (w.resolve(event), true)));
  }

  waitFor(predicate) {
    const seen = this.events.find(predicate);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve) => this.waiters.push({ predicate, resolve }));
  }

  waitForState(state, extra = () => true) {
    return this.waitFor((e) => e.name === 'onState' && e.args[0] === state && extra(e.args[1]));
  }

  count(name) {
    return this.events.filter((e) => e.name === name).length;
  }
}

function sessionStart(id) {
  return {
    type: 'session_start',
    session_id: id,
    protocol_version: 1,
    input: { rate: 16000 },
    output: { rate: 24000 },
    model: 'test',
    demo_weights: true,
    max_sessions: 2,
  };
}

function makeConnection(url, recorder, options = {}) {
  return new AgentConnection({
    url,
    handlers: recorder.handlers(),
    // No jitter, short delays: deterministic and fast.
    backoff: new Backoff({ initialMs: 20, factor: 2, maxMs: 200, jitter: 0 }),
    ...options,
  });
}

if (typeof WebSocket === 'undefined') {
  test('AgentConnection (re-run with --experimental-websocket)', () => {
    const file = fileURLToPath(import.meta.url);
    // Run the file as a plain script: it then runs its tests and exits non-zero if any fails. Without
    // NODE_TEST_CONTEXT, which would make the child report to a parent runner instead of running them.
    const env = { ...process.env };
    delete env.NODE_TEST_CONTEXT;
    const child = spawnSync(process.execPath, ['--experimental-websocket', file], {
      encoding: 'utf8',
      timeout: 60000,
      env,
    });
    assert.equal(child.status, 0, `${child.stdout}\n${child.stderr}`);
    assert.match(child.stdout, /# pass 6\n/);
  });
} else {
  describe('AgentConnection', () => {
    let server;
    before(async () => {
      server = await startWsServer();
    });
    after(() => server.close());

    test('runs a session: pings, pongs, audio both ways, control messages, then a clean Stop', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder);
      client.start();
      const peer = await server.connection(base);
      // The client pings as soon as the socket opens.
      const ping = await peer.nextJson('ping');
      assert.ok(Number.isInteger(ping.id) && typeof ping.t_ms === 'number');
      peer.sendJson(sessionStart('s-1'));
      peer.sendJson({ type: 'pong', id: ping.id, t_ms: ping.t_ms });
      await recorder.waitForState('live');
      assert.equal(client.sessionId, 's-1');
      assert.equal(client.connected, true);
      const rtt = await recorder.waitFor((e) => e.name === 'onRtt');
      assert.ok(rtt.args[0] >= 0 && rtt.args[0] < 5000);
      assert.equal(client.rtt.samples, 1);

      // Server pings are answered with the same id and t_ms.
      peer.sendJson({ type: 'ping', id: 77, t_ms: 1234.5 });
      assert.deepEqual(await peer.nextJson('pong'), { type: 'pong', id: 77, t_ms: 1234.5 });

      // Server audio reaches onAudio as an ArrayBuffer; malformed binary is ignored.
      peer.sendBinary(new Uint8Array([KIND_SERVER_AUDIO, 1, 2]));
      peer.sendBinary(new Uint8Array(encodeAudioFrame(new Float32Array(480).fill(0.5), KIND_SERVER_AUDIO)));
      const audio = await recorder.waitFor((e) => e.name === 'onAudio');
      assert.ok(audio.args[0] instanceof ArrayBuffer);
      assert.equal(audio.args[0].byteLength, 961);
      assert.equal(client.framesReceived, 1);

      // Control messages reach their handlers; junk and unknown types do not break anything.
      peer.sendText('not json');
      peer.sendJson({ type: 'something_new' });
      peer.sendJson({ type: 'vad', event: 'start', t_ms: 5 });
      peer.sendJson({ type: 'transcript', text: 'నమస్కారం', t_ms: 6 });
      peer.sendJson({ type: 'latency', ms: 12.5, breakdown: {}, p99_ms: 20, dropped_frames: 0, window_s: 1 });
      assert.equal((await recorder.waitFor((e) => e.name === 'onVad')).args[0].event, 'start');
      const transcript = await recorder.waitFor((e) => e.name === 'onTranscript');
      assert.equal(transcript.args[0].text, 'నమస్కారం');
      assert.equal((await recorder.waitFor((e) => e.name === 'onLatency')).args[0].ms, 12.5);

      // Client audio goes out as one binary message per frame, as built.
      const frame = encodeAudioFrame(new Float32Array(320).fill(0.25));
      assert.equal(client.sendAudio(frame), true);
      const received = await peer.nextMessage((m) => m.kind === 'binary');
      assert.equal(received.data.length, 641);
      assert.equal(received.data[0], 0x01);
      assert.equal(client.framesSent, 1);

      // Stop: tells the server, closes with 1000, and stays stopped.
      client.stop();
      assert.deepEqual(await peer.nextJson('session_end'), { type: 'session_end', reason: 'client_request' });
      assert.equal((await peer.closedPromise()).code, 1000);
      assert.equal(client.state, 'stopped');
      assert.equal(client.retryTimer, null);
      assert.equal(client.sendAudio(frame), false);
      assert.ok(!recorder.events.some((e) => e.name === 'onState' && e.args[0] === 'reconnecting'));
    });

    test('reconnects after the server goes away (1001) and starts a new session', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder);
      client.start();
      const first = await server.connection(base);
      first.sendJson(sessionStart('first'));
      await recorder.waitForState('live');
      first.sendJson({ type: 'error', code: 'shutdown', msg: 'server shutting down', fatal: true });
      first.close(1001, 'going away');
      const reconnecting = await recorder.waitForState('reconnecting');
      assert.equal(reconnecting.args[1].code, 1001);
      assert.equal(reconnecting.args[1].shutdown, true);
      assert.equal(reconnecting.args[1].delayMs, 20);
      const second = await server.connection(base + 1);
      second.sendJson(sessionStart('second'));
      await recorder.waitForState('live', (detail) => detail.session.session_id === 'second');
      assert.equal(client.sessionId, 'second');
      assert.equal(client.reconnects, 1);
      client.stop();
      await second.closedPromise();
    });

    test('a full server (capacity, 1013) is reported as such and retried with growing delays', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder);
      client.start();
      for (let i = 0; i < 3; i++) {
        const peer = await server.connection(base + i);
        peer.sendJson({ type: 'error', code: 'capacity', msg: 'server full', fatal: true });
        peer.close(1013, 'capacity');
      }
      const accepted = await server.connection(base + 3);
      accepted.sendJson(sessionStart('finally'));
      await recorder.waitForState('live');
      const waits = recorder.events.filter((e) => e.name === 'onState' && e.args[0] === 'reconnecting');
      assert.deepEqual(
        waits.map((e) => [e.args[1].code, e.args[1].capacity, e.args[1].delayMs]),
        [
          [1013, true, 20],
          [1013, true, 40],
          [1013, true, 80],
        ],
      );
      assert.equal(client.lastServerError.code, 'capacity');
      // Once a session starts the back-off begins again from its first step.
      assert.equal(client.backoff.attempt, 0);
      client.stop();
      await accepted.closedPromise();
    });

    test('a dropped connection (no close frame) is noticed and reconnected', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder);
      client.start();
      const first = await server.connection(base);
      first.sendJson(sessionStart('a'));
      await recorder.waitForState('live');
      first.destroy();
      const reconnecting = await recorder.waitForState('reconnecting');
      assert.equal(reconnecting.args[1].code, 1006);
      assert.equal(reconnecting.args[1].capacity, false);
      const second = await server.connection(base + 1);
      second.sendJson(sessionStart('b'));
      await recorder.waitForState('live', (detail) => detail.session.session_id === 'b');
      client.stop();
      await second.closedPromise();
    });

    test('a server that goes silent is abandoned and reconnected', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder, { pingIntervalMs: 50, silenceTimeoutMs: 200 });
      client.start();
      const mute = await server.connection(base);
      const reconnecting = await recorder.waitForState('reconnecting');
      assert.equal(reconnecting.args[1].code, CLOSE_CLIENT_TIMEOUT);
      assert.equal((await mute.closedPromise()).code, CLOSE_CLIENT_TIMEOUT);
      const second = await server.connection(base + 1);
      second.sendJson(sessionStart('heard'));
      await recorder.waitForState('live');
      client.stop();
      await second.closedPromise();
    });

    test('with no server at all it keeps retrying, slower each time, until stopped', async () => {
      const gone = await startWsServer();
      const url = gone.url;
      await gone.close();
      const recorder = new Recorder();
      const client = makeConnection(url, recorder);
      client.start();
      await recorder.waitFor(
        (e) => e.name === 'onState' && e.args[0] === 'connecting' && e.args[1].attempt === 4,
      );
      const delays = recorder.events
        .filter((e) => e.name === 'onState' && e.args[0] === 'reconnecting')
        .map((e) => e.args[1].delayMs);
      assert.deepEqual(delays, [20, 40, 80]);
      assert.equal(client.reconnects, 3);
      client.stop();
      assert.equal(client.state, 'stopped');
    });
  });
}
