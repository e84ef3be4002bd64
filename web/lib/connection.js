// The page's WebSocket session with the server: connect, keep alive, reconnect, dispatch messages.
//
// Knows nothing of the DOM or Web Audio, so Node's test runner drives it against a real socket. The
// WebSocket class, clock and timers are parameters for that reason (the browser's are the defaults).
//
// Life cycle: start() -> 'connecting' -> 'open' (socket open) -> 'live' (session_start received).
// Any close or error that the user did not ask for -> 'reconnecting' (a back-off timer) -> 'connecting'...
// until stop() -> 'stopped'. Audio handed to sendAudio() while not open is dropped, not queued: the agent
// must hear the present, not a backlog.

import { Backoff } from './backoff.js';
import { RttTracker } from './latency.js';
import { OpusLink, opusRequested, withoutCodec } from './opus.js';
import {
  CLIENT_FRAME_BYTES,
  CLOSE,
  clientSessionEndMessage,
  isServerAudioFrame,
  parseControlMessage,
  pingMessage,
  pongMessage,
} from './protocol.js';

const OPEN = 1;

export const CONNECTION_DEFAULTS = Object.freeze({
  pingIntervalMs: 1000,
  // No open after this long: give up on the attempt and back off.
  connectTimeoutMs: 5000,
  // Nothing at all from the server for this long (it sends audio 50 times and latency once a second):
  // the connection is dead even if TCP has not noticed yet.
  silenceTimeoutMs: 5000,
  // Stop queueing audio once this much is waiting in the socket (~25 frames = 500 ms).
  maxBufferedBytes: 25 * CLIENT_FRAME_BYTES,
});

/** A close code of our own for connections we abandon (application range 4000-4999). */
export const CLOSE_CLIENT_TIMEOUT = 4000;

export class AgentConnection {
  /**
   * @param {{
   *   url: string,
   *   handlers?: Partial<Record<'onState'|'onSessionStart'|'onSessionEnd'|'onDraining'|'onAudio'|'onLatency'|'onVad'|
   *     'onTranscript'|'onServerError'|'onRtt', Function>>,
   *   WebSocketImpl?: typeof WebSocket,
   *   backoff?: Backoff,
   *   now?: () => number,
   *   timers?: {setTimeout: Function, clearTimeout: Function,
   *     setInterval: Function, clearInterval: Function},
   *   webCodecs?: object,
   * } & Partial<typeof CONNECTION_DEFAULTS>} options  A `url` with ?codec=opus asks for Opus (lib/opus.js);
   *   `webCodecs` replaces the browser's AudioEncoder/AudioDecoder/EncodedAudioChunk/AudioData (tests).
   */
  constructor(options) {
    const {
      url,
      handlers = {},
      WebSocketImpl = globalThis.WebSocket,
      backoff = new Backoff(),
      now = () => performance.now(),
      timers = globalThis,
      webCodecs = {},
      ...rest
    } = options;
    this.url = url;
    this.handlers = handlers;
    this.WebSocketImpl = WebSocketImpl;
    this.backoff = backoff;
    this.now = now;
    this.timers = timers;
    this.settings = { ...CONNECTION_DEFAULTS, ...rest };
    this.rtt = new RttTracker();
    this.state = 'idle';
    this.socket = null;
    this.retryTimer = null;
    this.pingTimer = null;
    this.connectTimer = null;
    this.nextPingId = 1;
    this.lastHeardMs = 0;
    this.attempts = 0;
    /** Connections made after the first one. */
    this.reconnects = 0;
    this.sessionId = '';
    this.session = null;
    this.framesSent = 0;
    this.framesReceived = 0;
    this.framesDropped = 0;
    /** The latest `error` message from the server, kept for display. */
    this.lastServerError = null;
    /** The `error` message received on the current socket, if any: it explains that socket's close. */
    this.socketError = null;
    this.lastClose = null;
    /** What the current session speaks ("pcm_s16le" or "opus", from session_start); '' between sessions. */
    this.codec = '';
    // Opus when the URL asks for it and the browser can (checked once, before the first connect).
    this.opus = opusRequested(url)
      ? new OpusLink({
          onPacket: (frame) => this.socket?.readyState === OPEN && this.socket.send(frame),
          onFrame: (frame) => this.deliverAudio(frame),
          onError: () => this.opusFailed(),
          ...webCodecs,
        })
      : null;
  }

  get connected() {
    return this.socket !== null && this.socket.readyState === OPEN;
  }

  /** Connect (and keep reconnecting) until stop(). */
  start() {
    if (this.state !== 'idle' && this.state !== 'stopped') return;
    this.attempts = 0;
    this.reconnects = 0;
    this.backoff.reset();
    this.connect();
  }

  /** End the session at the user's request: tell the server, close, and do not reconnect. */
  stop() {
    this.clearTimers();
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      this.detach(socket);
      if (socket.readyState === OPEN) {
        try {
          socket.send(clientSessionEndMessage());
        } catch {
          // The socket may be closing under us; closing it is all that is left to do.
        }
      }
      if (socket.readyState <= OPEN) socket.close(CLOSE.NORMAL, 'client stop');
    }
    this.sessionId = '';
    this.session = null;
    this.codec = '';
    this.opus?.end();
    this.setState('stopped', {});
  }

  /** Send a control message (JSON text) while the session is live. Returns whether it was sent. */
  sendControl(text) {
    if (!this.connected || this.state !== 'live') return false;
    this.socket.send(text);
    return true;
  }

  /**
   * Send one client audio frame if the socket can take it now. Returns whether it was sent.
   * The frame is dropped when the socket is not open or is already backed up.
   */
  sendAudio(frame) {
    const socket = this.socket;
    const backedUp = socket !== null && socket.bufferedAmount > this.settings.maxBufferedBytes;
    if (socket === null || socket.readyState !== OPEN || backedUp) {
      this.framesDropped++;
      return false;
    }
    if (this.codec === '' && this.opus?.supported) {
      // Opus was asked for and session_start has not said yet what this session speaks: a PCM frame now
      // would be refused (`bad_header`), so the microphone's first few ms before it wait for nothing.
      this.framesDropped++;
      return false;
    }
    if (this.opus?.active) this.opus.encode(frame); // its packet goes out when the encoder gives it
    else socket.send(frame);
    this.framesSent++;
    return true;
  }

  deliverAudio(frame) {
    this.framesReceived++;
    this.handlers.onAudio?.(frame);
  }

  /** The browser's codec failed mid-session: reconnect with PCM (what a browser without WebCodecs does). */
  opusFailed() {
    if (this.opus === null) return;
    this.opus.supported = false;
    this.opus.end();
    if (this.socket !== null) this.abandon(this.socket, 'opus codec failed');
  }

  connect() {
    if (this.opus !== null && this.opus.supported === null) {
      this.opus.detect().then(() => {
        if (this.state !== 'stopped' && this.socket === null) this.connect();
      });
      return;
    }
    this.attempts++;
    if (this.attempts > 1) this.reconnects++;
    this.socketError = null;
    this.setState('connecting', { attempt: this.attempts });
    let socket;
    try {
      socket = new this.WebSocketImpl(this.opus?.supported === false ? withoutCodec(this.url) : this.url);
    } catch (error) {
      this.scheduleReconnect({ code: null, reason: String(error), wasClean: false });
      return;
    }
    socket.binaryType = 'arraybuffer';
    this.socket = socket;
    socket.onopen = () => this.onOpen(socket);
    socket.onmessage = (event) => this.onMessage(socket, event.data);
    socket.onclose = (event) => this.onClose(socket, event);
    // Browsers follow an error with a close event, which is where recovery happens; some clients (Node
    // 20's) never close a socket that failed to connect, so a failure before open is handled here.
    socket.onerror = () => {
      if (socket === this.socket && socket.readyState !== OPEN) {
        this.onClose(socket, { code: 1006, reason: 'connection failed', wasClean: false });
      }
    };
    this.connectTimer = this.timers.setTimeout(() => {
      if (this.socket === socket && socket.readyState !== OPEN) this.abandon(socket, 'connect timeout');
    }, this.settings.connectTimeoutMs);
  }

  onOpen(socket) {
    if (socket !== this.socket) return;
    this.timers.clearTimeout(this.connectTimer);
    this.connectTimer = null;
    this.lastHeardMs = this.now();
    this.setState('open', { attempt: this.attempts });
    this.sendPing();
    this.pingTimer = this.timers.setInterval(() => this.tick(socket), this.settings.pingIntervalMs);
  }

  tick(socket) {
    if (socket !== this.socket) return;
    if (this.now() - this.lastHeardMs > this.settings.silenceTimeoutMs) {
      this.abandon(socket, 'server silent');
      return;
    }
    this.sendPing();
  }

  sendPing() {
    if (!this.connected) return;
    this.socket.send(pingMessage(this.nextPingId++, this.now()));
  }

  onMessage(socket, data) {
    if (socket !== this.socket) return;
    this.lastHeardMs = this.now();
    if (typeof data !== 'string') {
      if (this.opus?.active) this.opus.decode(data);
      else if (isServerAudioFrame(data)) this.deliverAudio(data);
      return;
    }
    const message = parseControlMessage(data);
    if (message === null) return;
    switch (message.type) {
      case 'ping':
        socket.send(pongMessage(message));
        break;
      case 'pong': {
        const rtt = this.rtt.record(message.t_ms, this.now());
        if (rtt !== null) this.handlers.onRtt?.(rtt, this.rtt);
        break;
      }
      case 'session_start':
        this.session = message;
        this.sessionId = String(message.session_id ?? '');
        this.codec = String(message.input?.encoding ?? 'pcm_s16le');
        if (this.codec === 'opus' && this.opus !== null) this.opus.begin();
        else this.opus?.end();
        // The server accepted us: the next failure starts its back-off from the beginning again.
        this.backoff.reset();
        this.setState('live', { session: message });
        this.handlers.onSessionStart?.(message);
        break;
      case 'session_end':
        this.handlers.onSessionEnd?.(message);
        break;
      case 'draining':
        this.handlers.onDraining?.(message);
        break;
      case 'latency':
        this.handlers.onLatency?.(message);
        break;
      case 'vad':
        this.handlers.onVad?.(message);
        break;
      case 'transcript':
        this.handlers.onTranscript?.(message);
        break;
      case 'error':
        this.lastServerError = message;
        this.socketError = message;
        this.handlers.onServerError?.(message);
        break;
      default:
        // Unknown types are ignored so that the server may add messages without breaking old pages.
        break;
    }
  }

  onClose(socket, event) {
    if (socket !== this.socket) return;
    this.scheduleReconnect({ code: event.code, reason: event.reason, wasClean: event.wasClean });
  }

  /** Drop a connection that is not working and back off as if it had closed. */
  abandon(socket, reason) {
    this.detach(socket);
    try {
      socket.close(CLOSE_CLIENT_TIMEOUT, reason);
    } catch {
      // Already closing.
    }
    this.scheduleReconnect({ code: CLOSE_CLIENT_TIMEOUT, reason, wasClean: false });
  }

  detach(socket) {
    socket.onopen = null;
    socket.onmessage = null;
    socket.onclose = null;
    socket.onerror = null;
  }

  scheduleReconnect(close) {
    this.clearTimers();
    if (this.socket) this.detach(this.socket);
    this.socket = null;
    this.sessionId = '';
    this.session = null;
    this.codec = '';
    this.opus?.end();
    const capacity = close.code === CLOSE.TRY_AGAIN_LATER || this.socketError?.code === 'capacity';
    const shutdown = close.code === CLOSE.GOING_AWAY || this.socketError?.code === 'shutdown';
    const delayMs = this.backoff.next();
    this.lastClose = { ...close, capacity, shutdown, delayMs, serverError: this.socketError };
    this.setState('reconnecting', this.lastClose);
    this.retryTimer = this.timers.setTimeout(() => {
      this.retryTimer = null;
      this.connect();
    }, delayMs);
  }

  clearTimers() {
    if (this.retryTimer !== null) this.timers.clearTimeout(this.retryTimer);
    if (this.pingTimer !== null) this.timers.clearInterval(this.pingTimer);
    if (this.connectTimer !== null) this.timers.clearTimeout(this.connectTimer);
    this.retryTimer = null;
    this.pingTimer = null;
    this.connectTimer = null;
  }

  setState(state, detail) {
    this.state = state;
    this.handlers.onState?.(state, detail);
  }
}
