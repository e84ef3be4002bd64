// AgentConnection against a real WebSocket server (helpers/ws_server.mjs) with Node's own WebSocket
// client. Node 20 keeps that client behind --experimental-websocket: without it, this file re-runs itself
// with the flag in a child process.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Backoff } from '../../web/lib/backoff.js';
import { AgentConnection, CLOSE_CLIENT_TIMEOUT, withResume } from '../../web/lib/connection.js';
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
      'onDraining',
      'onAudio',
      'onLatency',
      'onVad',
      'onTranscript',
      'onServerError',
      'onRtt',
      'onResumed',
      'onNewConversation',
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

function sessionStart(id, extra = {}) {
  return {
    type: 'session_start',
    session_id: id,
    protocol_version: 1,
    input: { rate: 16000 },
    output: { rate: 24000 },
    model: 'test',
    demo_weights: true,
    max_sessions: 2,
    ...extra,
  };
}

/** A session_start of a server that resumes: a token and its window. */
function resumableStart(id, token, extra = {}) {
  return sessionStart(id, { resume_token: token, resume_window_s: 10, resumed: false, ...extra });
}

/** The query of the URL a server connection was asked for. */
function query(peer) {
  return new URL(peer.url, 'http://localhost').searchParams;
}

/** The n-th (1-based) `reconnecting` state's detail, once it has happened. */
async function nthReconnecting(recorder, n) {
  await recorder.waitFor(() => recorder.events.filter(isReconnecting).length >= n);
  return recorder.events.filter(isReconnecting)[n - 1].args[1];
}

function isReconnecting(event) {
  return event.name === 'onState' && event.args[0] === 'reconnecting';
}

// What detect() asks of WebCodecs, answered yes: the connection keeps ?codec=opus in its URL (Node has no
// WebCodecs; the sessions below speak PCM, so no codec is ever made).
const OPUS_CAPABLE = {
  Encoder: { isConfigSupported: async () => ({ supported: true }) },
  Decoder: { isConfigSupported: async () => ({ supported: true }) },
};

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
    assert.match(child.stdout, /# pass 12\n/);
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
      // A server that does not resume (no token): the reconnection is a new session, as it always was.
      assert.equal(reconnecting.args[1].resume, false);
      assert.equal(query(second).has('resume'), false);
      second.sendJson(sessionStart('b'));
      await recorder.waitForState('live', (detail) => detail.session.session_id === 'b');
      client.stop();
      await second.closedPromise();
    });

    test('a dropped live session is resumed at once with its token, other URL parameters kept', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const url = `${server.url}?codec=opus&token=secret`;
      const client = makeConnection(url, recorder, { webCodecs: OPUS_CAPABLE });
      client.start();
      const first = await server.connection(base);
      assert.equal(query(first).has('resume'), false);
      first.sendJson(resumableStart('s-1', 'tok-1'));
      await recorder.waitForState('live');
      assert.equal(client.resumeToken, 'tok-1');
      first.destroy();
      const lost = await nthReconnecting(recorder, 1);
      assert.deepEqual([lost.code, lost.resume, lost.delayMs], [1006, true, 0]);
      const second = await server.connection(base + 1);
      const asked = query(second);
      const params = ['resume', 'codec', 'token'].map((name) => asked.get(name));
      assert.deepEqual(params, ['tok-1', 'opus', 'secret']);
      const connecting = await recorder.waitForState('connecting', (detail) => detail.attempt === 2);
      assert.equal(connecting.args[1].resume, true);
      // The server re-attached it: same session, a fresh token.
      second.sendJson(resumableStart('s-1', 'tok-2', { resumed: true, resume_gap_s: 0.05 }));
      const live = await recorder.waitForState('live', (detail) => detail.resumed === true);
      assert.equal(live.args[1].resumeRefused, false);
      const resumed = await recorder.waitFor((e) => e.name === 'onResumed');
      assert.equal(resumed.args[0].session_id, 's-1');
      assert.equal(recorder.count('onNewConversation'), 0);
      assert.deepEqual([client.sessionId, client.resumes, client.resumeFailures], ['s-1', 1, 0]);
      assert.equal(client.resumeToken, 'tok-2');
      // onResumed comes before onSessionStart, which still hears every session_start.
      const order = recorder.events
        .map((e) => e.name)
        .filter((name) => name === 'onResumed' || name === 'onSessionStart');
      assert.deepEqual(order, ['onSessionStart', 'onResumed', 'onSessionStart']);
      client.stop();
      assert.equal((await second.closedPromise()).code, 1000);
      assert.equal(client.resumeToken, null); // stop ended the session: nothing to resume
      // withResume replaces a token already there and keeps the rest.
      const again = new URL(withResume(`${url}&resume=old`, 'new')).searchParams;
      assert.deepEqual([...again.getAll('resume'), again.get('codec')], ['new', 'opus']);
    });

    test('Stop while a drop is being resumed ends the session on the server', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder);
      client.start();
      const first = await server.connection(base);
      first.sendJson(resumableStart('s-stop', 'tok-stop'));
      await recorder.waitForState('live');
      first.destroy();
      await nthReconnecting(recorder, 1);
      client.stop(); // the resume has not come through: no socket can say goodbye
      assert.equal(client.state, 'stopped');
      // A connection of its own resumes the session with its token only to end it.
      let goodbye = null;
      for (let n = base + 1; goodbye === null; n++) {
        const connection = await server.connection(n);
        if (query(connection).get('resume') !== 'tok-stop') continue;
        const said = await Promise.race([
          connection.nextJson('session_end').then(() => true),
          connection.closedPromise().then(() => false),
        ]);
        if (said) goodbye = connection;
      }
      goodbye.sendJson(resumableStart('s-stop', 'tok-next', { resumed: true }));
      goodbye.close(1000, 'session ended');
      await goodbye.closedPromise();
      assert.equal(client.state, 'stopped');
      assert.equal(recorder.count('onResumed'), 0); // the goodbye is not a session of the page's
    });

    test('a silent server, abandoned with 4000, is resumed too', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder, { pingIntervalMs: 50, silenceTimeoutMs: 200 });
      client.start();
      const mute = await server.connection(base);
      mute.sendJson(resumableStart('quiet', 'tok-q'));
      await recorder.waitForState('live');
      const abandoned = await nthReconnecting(recorder, 1);
      assert.deepEqual([abandoned.code, abandoned.resume], [CLOSE_CLIENT_TIMEOUT, true]);
      // 4000 on the wire: the server keeps the session for the resume.
      assert.equal((await mute.closedPromise()).code, CLOSE_CLIENT_TIMEOUT);
      const second = await server.connection(base + 1);
      assert.equal(query(second).get('resume'), 'tok-q');
      second.sendJson(resumableStart('quiet', 'tok-r', { resumed: true }));
      await recorder.waitFor((e) => e.name === 'onResumed');
      client.stop();
      await second.closedPromise();
    });

    test('a refused resume starts a new conversation; its resume_failed is no fatal error', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder);
      client.start();
      const first = await server.connection(base);
      first.sendJson(resumableStart('old', 'tok-old'));
      await recorder.waitForState('live');
      first.destroy();
      const second = await server.connection(base + 1);
      assert.equal(query(second).get('resume'), 'tok-old');
      // What the server answers to a token it does not know: a fresh session, then the error.
      second.sendJson(resumableStart('fresh', 'tok-fresh'));
      second.sendJson({ type: 'error', code: 'resume_failed', msg: 'unknown resume token', fatal: false });
      second.sendJson({ type: 'vad', event: 'start', t_ms: 1 }); // heard after the error
      await recorder.waitFor((e) => e.name === 'onVad');
      const live = await recorder.waitForState('live', (detail) => detail.session.session_id === 'fresh');
      assert.deepEqual([live.args[1].resumed, live.args[1].resumeRefused], [false, true]);
      const fresh = await recorder.waitFor((e) => e.name === 'onNewConversation');
      assert.equal(fresh.args[0].session_id, 'fresh');
      assert.equal(recorder.count('onResumed'), 0);
      assert.equal(recorder.count('onServerError'), 0);
      assert.equal(client.lastServerError, null);
      assert.equal(client.lastResumeFailure.code, 'resume_failed');
      assert.deepEqual(
        [client.state, client.connected, client.resumes, client.resumeFailures],
        ['live', true, 0, 1],
      );
      // The new session resumes with its own token.
      second.destroy();
      const third = await server.connection(base + 2);
      assert.equal(query(third).get('resume'), 'tok-fresh');
      assert.equal((await nthReconnecting(recorder, 2)).serverError, null);
      // Live again before Stop: a Stop during the resume would open a goodbye connection of its own.
      third.sendJson(resumableStart('fresh', 'tok-next', { resumed: true }));
      await recorder.waitForState('live', (detail) => detail.resumed === true);
      client.stop();
      await third.closedPromise();
    });

    test('a session that ended or that the server closed is not resumed; a plain drop is', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      const client = makeConnection(server.url, recorder);
      client.start();
      // session_end, then the link drops before the close: that session is over.
      const ended = await server.connection(base);
      ended.sendJson(resumableStart('a', 'tok-a'));
      ended.sendJson({ type: 'session_end', reason: 'idle_timeout' });
      await recorder.waitFor((e) => e.name === 'onSessionEnd');
      ended.destroy();
      const afterEnd = await nthReconnecting(recorder, 1);
      assert.deepEqual([afterEnd.resume, afterEnd.delayMs], [false, 20]); // the usual back-off
      const b = await server.connection(base + 1);
      assert.equal(query(b).has('resume'), false);
      // A plain drop of the next session is resumed...
      b.sendJson(resumableStart('b', 'tok-b'));
      await recorder.waitForState('live', (detail) => detail.session.session_id === 'b');
      b.destroy();
      const c = await server.connection(base + 2);
      assert.equal(query(c).get('resume'), 'tok-b');
      c.sendJson(resumableStart('b', 'tok-c', { resumed: true }));
      await recorder.waitFor((e) => e.name === 'onResumed');
      // ...but not one the server ends with a fatal error and a close frame (1011)...
      c.sendJson({ type: 'error', code: 'internal', msg: 'boom', fatal: true });
      c.close(1011, 'internal error');
      const internal = await nthReconnecting(recorder, 3);
      assert.deepEqual([internal.code, internal.resume], [1011, false]);
      const d = await server.connection(base + 3);
      assert.equal(query(d).has('resume'), false);
      // ...nor a server going away (1001: a drain ends the sessions it kept), even with no error before it.
      d.sendJson(resumableStart('d', 'tok-d'));
      await recorder.waitForState('live', (detail) => detail.session.session_id === 'd');
      d.close(1001, 'going away');
      const away = await nthReconnecting(recorder, 4);
      assert.deepEqual([away.code, away.shutdown, away.resume], [1001, true, false]);
      const e = await server.connection(base + 4);
      assert.equal(query(e).has('resume'), false);
      client.stop();
      await e.closedPromise();
    });

    test('the token is used only within the resume window, counted from the drop', async () => {
      const base = server.connections.length;
      const recorder = new Recorder();
      let clock = 1000;
      const client = makeConnection(server.url, recorder, {
        now: () => clock,
        resumeBackoff: new Backoff({ initialMs: 30, factor: 1, maxMs: 30, jitter: 0 }),
      });
      client.start();
      const first = await server.connection(base);
      first.sendJson(resumableStart('w', 'tok-w', { resume_window_s: 2 }));
      await recorder.waitForState('live');
      clock = 5000; // time while live does not count
      first.destroy();
      const second = await server.connection(base + 1);
      assert.equal(query(second).get('resume'), 'tok-w');
      // 1.5 s after the drop: still within the 2 s window; retries after the first at the resume pace.
      clock = 6500;
      second.destroy();
      const within = await nthReconnecting(recorder, 2);
      assert.deepEqual([within.resume, within.delayMs], [true, 30]);
      const third = await server.connection(base + 2);
      assert.equal(query(third).get('resume'), 'tok-w');
      // 2.5 s after it: the server has ended that session; a new one, with the usual back-off.
      clock = 7500;
      third.destroy();
      const past = await nthReconnecting(recorder, 3);
      assert.deepEqual([past.resume, past.delayMs], [false, 20]);
      const fourth = await server.connection(base + 3);
      assert.equal(query(fourth).has('resume'), false);
      assert.equal(client.resumeToken, null);
      client.stop();
      await fourth.closedPromise();
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
