// Page entry point: wires the microphone/speaker pipeline, the WebSocket session and the view together,
// and exposes `window.voiceAgent` for browser tests.
//
// Per audio frame the main thread does only this: a captured frame goes straight to ws.send(), a received
// frame is transferred straight to the playback worklet. Everything else (latency monitor, status) is
// refreshed a few times a second from counters.

import { AudioPipeline } from './audio.js';
import { Backoff } from './lib/backoff.js';
import { AgentConnection } from './lib/connection.js';
import { estimateMouthToEar, modelLatencyMs } from './lib/latency.js';
import {
  audioFailureText,
  drainingText,
  language,
  liveText,
  microphoneErrorText,
  reconnectText,
  sessionEndText,
  storedLanguage,
  storeLanguage,
  t,
} from './i18n.js';
import { ProbeCollector, probeEnabled } from './lib/probe.js';
import { webSocketUrl } from './lib/protocol.js';
import { ClientStatsReporter, readQuality } from './lib/stats.js';
import { View } from './view.js';

const REFRESH_MS = 250;
// The test hook returns the transcript; keep its tail bounded on long sessions.
const TRANSCRIPT_KEEP_CHARS = 20000;
// Longest wait between reconnection attempts. A restarted server must have the page streaming again within
// 5 s of being ready, and a restart (stop + model load) outlasts the first retries, so the gap between two
// attempts must stay under that; the default cap (10 s) let a page sit out 8 s after the server was back.
// One handshake every ~3 s per waiting page is no load on a server that is down or full.
const RECONNECT_MAX_DELAY_MS = 3000;

const EMPTY_PLAYBACK = Object.freeze({
  bufferMs: null,
  meanBufferMs: null,
  targetMs: null,
  underruns: 0,
  framesPlayed: 0,
});

class VoiceAgent {
  /** @param {View} view @param {string} pageUrl */
  constructor(view, pageUrl) {
    this.view = view;
    this.pageUrl = pageUrl;
    this.running = false;
    this.audio = null;
    this.audioInputs = {};
    this.rates = null;
    this.connection = null;
    this.refreshTimer = null;
    this.playback = EMPTY_PLAYBACK;
    this.latency = null;
    this.session = null;
    this.sessions = 0;
    this.speaking = false;
    this.transcript = '';
    // The latest problem shown: a function giving its text in the interface language ('' before any).
    this.lastError = null;
  }

  /** Start capture, playback and the session. Must run inside the click that asks for it. */
  start() {
    if (this.running) return Promise.resolve();
    this.running = true;
    this.playback = EMPTY_PLAYBACK;
    this.latency = null;
    this.session = null;
    this.sessions = 0;
    this.transcript = '';
    this.lastError = null;
    this.view.clearTranscript();
    this.view.setDemo(false);
    this.view.setRunning(true);
    this.view.setStatus(() => t('status.asking'), 'starting');
    // Created synchronously, still inside the user's gesture (see AudioPipeline).
    const audio = new AudioPipeline({
      onCaptureFrame: (frame) => {
        probe?.sent();
        this.connection?.sendAudio(frame);
      },
      onProbe: probe === null ? null : (message) => probe.add(message),
      onPlaybackStats: (stats) => {
        this.playback = stats;
      },
      onFailure: (what) => this.onAudioFailure(what),
    });
    this.audio = audio;
    this.rates = audio.rates;
    this.refreshTimer = setInterval(() => this.render(), REFRESH_MS);
    return this.openAudioThenConnect(audio);
  }

  async openAudioThenConnect(audio) {
    try {
      await audio.open();
    } catch (error) {
      if (this.audio !== audio) return; // stopped while the permission prompt was up
      this.lastError = () => microphoneErrorText(error);
      await this.teardown();
      this.view.setStatus(this.lastError, 'error');
      return;
    }
    if (this.audio !== audio) return;
    if (audio.suspended) this.resumeAudioOnNextGesture();
    this.connection = new AgentConnection({
      url: webSocketUrl(this.pageUrl),
      backoff: new Backoff({ maxMs: RECONNECT_MAX_DELAY_MS }),
      handlers: {
        onState: (state, detail) => this.onConnectionState(state, detail),
        onAudio: (frame) => {
          probe?.received();
          this.audio?.playFrame(frame);
        },
        onSessionStart: (message) => this.onSessionStart(message),
        onSessionEnd: (message) => this.view.setStatus(() => sessionEndText(message), 'connecting'),
        onDraining: (message) => this.view.setStatus(() => drainingText(message), 'live'),
        onLatency: (message) => {
          this.latency = message;
        },
        onVad: (message) => this.setSpeaking(message.event === 'start'),
        onTranscript: (message) => this.onTranscript(message),
        onServerError: (message) => {
          const text = `${message.code}: ${message.msg}`; // the server's own words (English)
          this.lastError = () => text;
        },
      },
    });
    this.connection.start();
  }

  /** Stop at the user's request: end the session and release the microphone. */
  async stop() {
    if (!this.running) return;
    await this.teardown();
    this.view.setStatus(() => t('status.stopped'), 'stopped');
  }

  async teardown() {
    this.running = false;
    this.connection?.stop();
    clearInterval(this.refreshTimer);
    this.refreshTimer = null;
    const audio = this.audio;
    this.audio = null;
    this.setSpeaking(false);
    this.view.setRunning(false);
    this.render();
    await audio?.close();
  }

  /** A worklet threw: nothing will be heard or sent, so stop and say so. */
  async onAudioFailure(what) {
    if (!this.running) return;
    this.lastError = () => audioFailureText(what);
    await this.teardown();
    this.view.setStatus(this.lastError, 'error');
  }

  onConnectionState(state, detail) {
    if (!this.running) return;
    if (state === 'connecting') {
      const attempt = detail.attempt;
      const text = () => (attempt > 1 ? t('status.reconnectAttempt', { attempt }) : t('status.connecting'));
      this.view.setStatus(text, attempt > 1 ? 'reconnecting' : 'connecting');
    } else if (state === 'open') {
      this.view.setStatus(() => t('status.open'), 'connecting');
    } else if (state === 'live') {
      const suspended = this.audio?.suspended;
      // After a drop: the same conversation goes on, or the server could only start a new one.
      const words = () =>
        detail.resumed
          ? t('status.resumed')
          : detail.resumeRefused
            ? t('status.newConversation')
            : liveText(detail.session);
      const text = () => (suspended ? `${words()} ${t('status.soundHint')}` : words());
      this.view.setStatus(text, 'live');
    } else if (state === 'reconnecting') {
      this.setSpeaking(false);
      const maxSessions = this.session?.max_sessions ?? null;
      this.lastError = () => reconnectText(detail, maxSessions);
      this.view.setStatus(this.lastError, 'reconnecting');
    }
  }

  onSessionStart(message) {
    this.session = message;
    this.view.setDemo(Boolean(message.demo_weights));
    // A resumed session is the session the server already had, the same conversation: its transcript runs
    // on and its `client_stats` stay counted from its first start, so nothing begins again.
    if (message.resumed === true) return;
    // `client_stats` once a second, counted from this session's start.
    this.clientStats ??= new ClientStatsReporter();
    this.clientStats.startSession(this.playback, performance.now());
    this.sessions++;
    if (this.sessions > 1) this.view.transcriptBreak();
  }

  onTranscript(message) {
    if (typeof message.text !== 'string' || message.text === '') return;
    // SentencePiece marks word starts with U+2581; show it as the space it stands for.
    const text = message.text.replaceAll('\u2581', ' ');
    this.transcript = (this.transcript + text).slice(-TRANSCRIPT_KEEP_CHARS);
    this.view.appendTranscript(text);
  }

  setSpeaking(speaking) {
    this.speaking = speaking;
    this.view.setSpeaking(speaking);
  }

  resumeAudioOnNextGesture() {
    const resume = () => this.audio?.resume();
    for (const type of ['pointerdown', 'keydown']) {
      document.addEventListener(type, resume, { once: true, capture: true });
    }
  }

  /** Everything the view and the test hook show, computed from the latest counters. */
  snapshot() {
    if (this.audio) this.audioInputs = this.audio.latencyInputs();
    const connection = this.connection;
    const rtt = connection?.rtt;
    const latency = this.latency;
    const rttMs = rtt?.smoothedMs ?? null;
    const serverMs = typeof latency?.ms === 'number' ? latency.ms : null;
    const bufferMs = this.playback.bufferMs;
    const estimate = estimateMouthToEar({
      ...this.audioInputs,
      rttMs,
      serverMs,
      // What a landing block waits behind (measured to match, bench/RESULTS.md); the mean depth until known.
      playbackBufferMs: this.playback.arrivalBufferMs ?? this.playback.meanBufferMs,
      modelMs: modelLatencyMs(this.session?.model),
    });
    return {
      rttMs,
      rttMinMs: rtt?.minMs ?? null,
      rttLastMs: rtt?.lastMs ?? null,
      serverMs,
      serverBreakdown: latency?.breakdown ?? null,
      serverP99Ms: latency?.p99_ms ?? null,
      serverDroppedFrames: latency?.dropped_frames ?? null,
      quality: readQuality(latency), // the server's per-session audio quality, checked field by field
      bufferMs,
      bufferTargetMs: this.playback.targetMs,
      underruns: this.playback.underruns,
      framesPlayed: this.playback.framesPlayed,
      framesSent: connection?.framesSent ?? 0,
      framesReceived: connection?.framesReceived ?? 0,
      reconnects: connection?.reconnects ?? 0,
      resumes: connection?.resumes ?? 0,
      resumeFailures: connection?.resumeFailures ?? 0,
      sessionId: connection?.sessionId ?? '',
      model: this.session?.model ?? '',
      // What this session's audio travels as: the server's `session_start` says (Opus when asked and
      // the browser has WebCodecs, PCM otherwise).
      codec: this.session ? (this.session.input?.encoding === 'opus' ? 'Opus' : 'PCM') : '',
      rates: this.rates,
      estimate,
    };
  }

  render() {
    const rttMs = this.connection?.rtt?.lastMs ?? null;
    const stats = this.clientStats?.poll(performance.now(), this.playback, rttMs);
    if (stats) this.connection?.sendControl(stats);
    this.view.renderMetrics(this.snapshot());
  }

  /** The test hook's view of the page (see the README of web/). */
  stats() {
    const s = this.snapshot();
    return {
      connected: this.connection?.connected ?? false,
      state: this.connection?.state ?? (this.running ? 'starting' : 'idle'),
      sessionId: s.sessionId,
      framesSent: s.framesSent,
      framesReceived: s.framesReceived,
      framesPlayed: s.framesPlayed,
      underruns: s.underruns,
      bufferMs: s.bufferMs,
      bufferTargetMs: s.bufferTargetMs,
      rttMs: s.rttMs,
      serverMs: s.serverMs,
      mouthToEarMs: s.rttMs === null || s.serverMs === null ? null : s.estimate.totalMs,
      mouthToEarParts: Object.fromEntries(s.estimate.parts.map((part) => [part.key, part.ms])),
      speaking: this.speaking,
      reconnects: s.reconnects,
      resumes: s.resumes,
      resumeFailures: s.resumeFailures,
      transcript: this.transcript,
      lastError: this.lastError ? this.lastError() : '',
      quality: s.quality,
      language: language(),
      demoWeights: Boolean(this.session?.demo_weights),
      captureRate: this.rates?.capture ?? null,
      playbackRate: this.rates?.playback ?? null,
    };
  }
}

// The mouth-to-ear probe (?probe=1, lib/probe.js): null, and nothing recorded, unless asked for.
const probe = probeEnabled(window.location.href) ? new ProbeCollector() : null;
// localStorage itself may be refused (a sandboxed frame): the choice then lasts for this visit only.
const storage = (() => {
  try {
    return window.localStorage;
  } catch {
    return null;
  }
})();
const view = new View(document);
view.applyLanguage(storedLanguage(storage));
const agent = new VoiceAgent(view, window.location.href);
// Telugu by default; the toggle switches every interface text and remembers the choice for the next visit.
view.langToggle.addEventListener('click', () => {
  const next = language() === 'te' ? 'en' : 'te';
  storeLanguage(storage, next);
  view.applyLanguage(next);
});
view.startButton.addEventListener('click', () => agent.start());
view.stopButton.addEventListener('click', () => agent.stop());
// Leaving the page ends the session cleanly instead of leaving the server to notice a dead socket.
window.addEventListener('pagehide', () => agent.connection?.stop());
if (probe !== null) window.voiceAgentProbe = Object.freeze({ take: () => probe.take() });
window.voiceAgent = Object.freeze({
  stats: () => agent.stats(),
  start: () => agent.start(),
  stop: () => agent.stop(),
});
if (new URLSearchParams(window.location.search).get('autostart') === '1') agent.start();
