// The page's WebSocket session with the server: connect, keep alive, reconnect, dispatch messages.
//
// Knows nothing of the DOM or Web Audio, so Node's test runner drives it against a real socket. The
// WebSocket class, clock and timers are parameters for that reason (the browser's are the defaults).
//
// Life cycle: start() -> 'connecting' -> 'open' (socket open) -> 'live' (session_start received).
// Any close or error that the user did not ask for -> 'reconnecting' (a back-off timer) -> 'connecting'...
// until stop() -> 'stopped'. Audio handed to sendAudio() while not open is dropped, not queued: the agent
// must hear the present, not a backlog.
//
// Resume: every session_start may carry a `resume_token` and the `resume_window_s` for which the server keeps
// the session after its link drops. When the link of a live session is lost (no close frame, or a silent
// server abandoned with 4000) and the session did not end, the next connections ask for it back with
// ?resume=TOKEN, the first at once and then about once a second, until one gets a session_start or the
// window (counted from the drop on this.now()) has passed; after that they reconnect as a new session. A
// close the server decided on (a close frame: 1000, 1001, 1008, 1011, 1013, ...), a `session_end`, a fatal
// `error` or stop() forget the token: that session is gone.

import { Backoff, RESUME_BACKOFF } from './backoff.js';
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
  // The same while resuming. Shorter: a handshake into a link that is still dead (dropped SYNs) would hold
  // the next try back past the 2 s in which a resumed conversation should go on once the network is back.
  resumeConnectTimeoutMs: 1500,
  // Nothing at all from the server for this long (it sends audio 50 times and latency once a second):
  // the connection is dead even if TCP has not noticed yet.
  silenceTimeoutMs: 5000,
  // Stop queueing audio once this much is waiting in the socket (~25 frames = 500 ms).
  maxBufferedBytes: 25 * CLIENT_FRAME_BYTES,
});

/** A close code of our own for connections we abandon (application range 4000-4999). The server takes it as
 * "the link is dead, the client will resume": it keeps the session for its resume window. */
export const CLOSE_CLIENT_TIMEOUT = 4000;

/** The close code of a socket that ended with no close frame (the browser's; never sent on the wire). */
const CLOSE_ABNORMAL = 1006;

/** The server's `error` code for a resume it could not honour: the session_start before it is a fresh one. */
export const RESUME_FAILED = 'resume_failed';

/** `url` asking to resume the session of `token` (?resume=TOKEN; its other parameters kept). */
export function withResume(url, token) {
  const parsed = new URL(url);
  parsed.searchParams.set('resume', token);
  return parsed.toString();
}

export class AgentConnection {
  /**
   * @param {{
   *   url: string,
   *   handlers?: Partial<Record<'onState'|'onSessionStart'|'onSessionEnd'|'onDraining'|'onAudio'|'onLatency'|'onVad'|
   *     'onTranscript'|'onServerError'|'onRtt'|'onResumed'|'onNewConversation', Function>>,
   *   WebSocketImpl?: typeof WebSocket,
   *   backoff?: Backoff,
   *   resumeBackoff?: Backoff,
   *   now?: () => number,
   *   timers?: {setTimeout: Function, clearTimeout: Function,
   *     setInterval: Function, clearInterval: Function},
   *   webCodecs?: object,
   * } & Partial<typeof CONNECTION_DEFAULTS>} options  A `url` with ?codec=opus asks for Opus (lib/opus.js);
   *   `webCodecs` replaces the browser's AudioEncoder/AudioDecoder/EncodedAudioChunk/AudioData (tests).
   *   `onResumed(session)`: a session_start that re-attached the dropped session (the conversation goes on);
   *   `onNewConversation(session)`: the page asked to resume and the server started a fresh session instead
   *   (its `resume_failed` error that follows is not a problem of the session: no onServerError). Both come
   *   before onSessionStart, which is called for every session_start.
   */
  constructor(options) {
    const {
      url,
      handlers = {},
      WebSocketImpl = globalThis.WebSocket,
      backoff = new Backoff(),
      resumeBackoff = new Backoff(RESUME_BACKOFF),
      now = () => performance.now(),
      timers = globalThis,
      webCodecs = {},
      ...rest
    } = options;
    this.url = url;
    this.handlers = handlers;
    this.WebSocketImpl = WebSocketImpl;
    this.backoff = backoff;
    this.resumeBackoff = resumeBackoff;
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
    /** The latest session_start's resume token; null when the server does not resume or the session ended. */
    this.resumeToken = null;
    this.resumeWindowMs = 0;
    /** When (this.now()) the link of the session dropped, while it may still be resumed; null otherwise. */
    this.droppedAtMs = null;
    /** Whether the current socket asked to resume (its URL carries ?resume=). */
    this.resumeAsked = false;
    /** Sessions taken back after a drop, and resumes the server answered with a fresh session. */
    this.resumes = 0;
    this.resumeFailures = 0;
    /** The latest `resume_failed` error, kept apart from lastServerError: it is no problem of the session. */
    this.lastResumeFailure = null;
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
    this.resumes = 0;
    this.resumeFailures = 0;
    this.forgetResume();
    this.backoff.reset();
    this.connect();
  }

  /** End the session at the user's request: tell the server, close, and do not reconnect. */
  stop() {
    // A drop being resumed: the session waits on the server and no open socket can say goodbye for it, so
    // one is opened to resume it only to end it (or it would hold its slot for the whole resume window).
    const orphan = this.resumable() && this.socket?.readyState !== OPEN
      ? withResume(this.url, this.resumeToken) : null;
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
    this.forgetResume(); // the session_end above (or the goodbye below) ends it on the server
    this.opus?.end();
    this.setState('stopped', {});
    if (orphan !== null) this.sayGoodbye(orphan);
  }

  /** Best effort, for stop(): resume the session at `url` only to send it `session_end`; the server answers
   * and closes. Given up after the resume handshake's timeout (the window ends the session anyway). */
  sayGoodbye(url) {
    let socket;
    try {
      socket = new this.WebSocketImpl(url);
    } catch {
      return;
    }
    const giveUp = this.timers.setTimeout(() => {
      try {
        socket.close(CLOSE.NORMAL, 'client stop');
      } catch {
        // Closing is all there was left to do.
      }
    }, this.settings.resumeConnectTimeoutMs);
    socket.onopen = () => {
      try {
        socket.send(clientSessionEndMessage());
      } catch {
        // The socket is going already.
      }
    };
    socket.onclose = () => this.timers.clearTimeout(giveUp);
    socket.onerror = () => {};
    socket.onmessage = () => {};
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
    // A new session in PCM rather than a resume: the kept session speaks Opus. Closed with 1000, not 4000,
    // so that the server ends it at once instead of holding its slot for the resume window.
    this.forgetResume();
    if (this.socket !== null) this.abandon(this.socket, 'opus codec failed', CLOSE.NORMAL);
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
    // The window may have passed while this try waited for its turn.
    const resume = this.resumable();
    if (!resume) this.forgetResume();
    this.resumeAsked = resume;
    this.setState('connecting', { attempt: this.attempts, resume });
    let url = this.opus?.supported === false ? withoutCodec(this.url) : this.url;
    if (resume) url = withResume(url, this.resumeToken);
    let socket;
    try {
      socket = new this.WebSocketImpl(url);
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
    this.connectTimer = this.timers.setTimeout(
      () => {
        if (this.socket === socket && socket.readyState !== OPEN) this.abandon(socket, 'connect timeout');
      },
      resume ? this.settings.resumeConnectTimeoutMs : this.settings.connectTimeoutMs,
    );
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
      case 'session_start': {
        const resumed = this.resumeAsked && message.resumed === true;
        const resumeRefused = this.resumeAsked && !resumed;
        this.resumeAsked = false;
        if (resumed) this.resumes++;
        if (resumeRefused) this.resumeFailures++;
        this.session = message;
        this.sessionId = String(message.session_id ?? '');
        this.codec = String(message.input?.encoding ?? 'pcm_s16le');
        if (this.codec === 'opus' && this.opus !== null) this.opus.begin();
        else this.opus?.end();
        this.rememberResume(message);
        // The server accepted us: the next failure starts its back-off from the beginning again.
        this.backoff.reset();
        this.setState('live', { session: message, resumed, resumeRefused });
        if (resumed) this.handlers.onResumed?.(message);
        if (resumeRefused) this.handlers.onNewConversation?.(message);
        this.handlers.onSessionStart?.(message);
        break;
      }
      case 'session_end':
        this.forgetResume(); // the server ended it: nothing is kept to resume
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
        if (message.code === RESUME_FAILED && message.fatal !== true) {
          // The answer to our ?resume=: the session_start before it began a fresh session (onNewConversation
          // said so), which goes on. Not a problem to show, nor one that would explain this socket's close.
          this.lastResumeFailure = message;
          break;
        }
        // A fatal error ends the session on the server (the close follows): it cannot be resumed.
        if (message.fatal === true) this.forgetResume();
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

  /**
   * Drop a connection that is not working and back off as if it had closed. With CLOSE_CLIENT_TIMEOUT (4000)
   * the server keeps the session for a resume; with CLOSE.NORMAL it ends it.
   */
  abandon(socket, reason, code = CLOSE_CLIENT_TIMEOUT) {
    this.detach(socket);
    try {
      socket.close(code, reason);
    } catch {
      // Already closing.
    }
    this.scheduleReconnect({ code, reason, wasClean: false });
  }

  detach(socket) {
    socket.onopen = null;
    socket.onmessage = null;
    socket.onclose = null;
    socket.onerror = null;
  }

  scheduleReconnect(close) {
    const wasLive = this.session !== null;
    this.clearTimers();
    if (this.socket) this.detach(this.socket);
    this.socket = null;
    this.sessionId = '';
    this.session = null;
    this.codec = '';
    this.opus?.end();
    const capacity = close.code === CLOSE.TRY_AGAIN_LATER || this.socketError?.code === 'capacity';
    const shutdown = close.code === CLOSE.GOING_AWAY || this.socketError?.code === 'shutdown';
    const resume = this.mayResume(close, wasLive);
    let delayMs;
    if (resume) {
      // The first try of a resume goes at once (a blip usually heals by then); the next ones at its own
      // short pace, not the growing back-off meant for a server that is down or full.
      const first = this.droppedAtMs === null;
      if (first) {
        this.droppedAtMs = this.now();
        this.resumeBackoff.reset();
      }
      delayMs = first ? 0 : this.resumeBackoff.next();
    } else {
      this.forgetResume();
      delayMs = this.backoff.next();
    }
    this.lastClose = { ...close, capacity, shutdown, resume, delayMs, serverError: this.socketError };
    this.setState('reconnecting', this.lastClose);
    this.retryTimer = this.timers.setTimeout(() => {
      this.retryTimer = null;
      this.connect();
    }, delayMs);
  }

  /**
   * Whether a socket that ended with `close` leaves a session on the server to resume: the page holds a
   * token (the session neither ended nor said goodbye), the socket had the session or was a try to resume
   * it, the link was lost rather than closed by the server, and the resume window has not passed.
   */
  mayResume(close, wasLive) {
    if (this.resumeToken === null) return false;
    if (!wasLive && this.droppedAtMs === null) return false;
    // No close frame (1006, or no socket at all) or one the page gave up on (4000): the server detaches the
    // session. A close frame from the server is its decision (an ending, a refusal, a drain, 4001 taken
    // over): the session is not waiting for this page.
    const lost = close.code === null || close.code === CLOSE_ABNORMAL || close.code === CLOSE_CLIENT_TIMEOUT;
    if (!lost) return false;
    const droppedAtMs = this.droppedAtMs ?? this.now();
    return this.now() - droppedAtMs < this.resumeWindowMs;
  }

  /** Whether the next connection asks to resume (a drop is being resumed and its window is still open). */
  resumable() {
    return (
      this.resumeToken !== null &&
      this.droppedAtMs !== null &&
      this.now() - this.droppedAtMs < this.resumeWindowMs
    );
  }

  /** Keep what a session_start says about resuming it: each carries a new token, the used one is spent. */
  rememberResume(message) {
    const token = message.resume_token;
    const windowS = Number(message.resume_window_s);
    this.resumeToken = typeof token === 'string' && token !== '' ? token : null;
    this.resumeWindowMs = Number.isFinite(windowS) && windowS > 0 ? windowS * 1000 : 0;
    this.droppedAtMs = null;
  }

  forgetResume() {
    this.resumeToken = null;
    this.resumeWindowMs = 0;
    this.droppedAtMs = null;
    this.resumeAsked = false;
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
