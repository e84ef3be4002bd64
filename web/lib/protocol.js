// Wire format of the voice agent's WebSocket (/ws), shared by the page, the worklets and the tests.
//
// Binary frames are one kind byte followed by 20 ms of mono int16 little-endian PCM:
//   client -> server: 0x01 + 320 samples at 16 kHz (641 bytes)
//   server -> client: 0x02 + 480 samples at 24 kHz (961 bytes)
// Everything else is a JSON text frame with a "type" field.

export const PROTOCOL_VERSION = 1;

export const KIND_CLIENT_AUDIO = 0x01;
export const KIND_SERVER_AUDIO = 0x02;

export const FRAME_MS = 20;
export const CLIENT_RATE = 16000;
export const SERVER_RATE = 24000;
export const CLIENT_FRAME_SAMPLES = (CLIENT_RATE * FRAME_MS) / 1000; // 320
export const SERVER_FRAME_SAMPLES = (SERVER_RATE * FRAME_MS) / 1000; // 480
export const CLIENT_FRAME_BYTES = 1 + 2 * CLIENT_FRAME_SAMPLES; // 641
export const SERVER_FRAME_BYTES = 1 + 2 * SERVER_FRAME_SAMPLES; // 961

/** WebSocket close codes the server uses. */
export const CLOSE = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001, // server shutting down: reconnect
  POLICY: 1008, // the server did not like what we sent
  TRY_AGAIN_LATER: 1013, // server full
});

/** Float sample in [-1, 1] to int16 (-1 -> -32768, 1 -> 32767), rounding to nearest and clipping. */
export function floatToInt16(sample) {
  const scaled = Math.round(sample < 0 ? sample * 32768 : sample * 32767);
  return scaled > 32767 ? 32767 : scaled < -32768 ? -32768 : scaled;
}

/** The inverse of floatToInt16. */
export function int16ToFloat(value) {
  return value < 0 ? value / 32768 : value / 32767;
}

/**
 * Build one binary audio frame: `kind` then the samples as int16 LE.
 * @param {Float32Array|number[]} samples floats in [-1, 1]
 * @param {number} [kind]
 * @returns {ArrayBuffer}
 */
export function encodeAudioFrame(samples, kind = KIND_CLIENT_AUDIO) {
  const buffer = new ArrayBuffer(1 + 2 * samples.length);
  const view = new DataView(buffer);
  view.setUint8(0, kind);
  for (let i = 0; i < samples.length; i++) view.setInt16(1 + 2 * i, floatToInt16(samples[i]), true);
  return buffer;
}

/**
 * Decode a binary audio frame into floats in [-1, 1].
 * @param {ArrayBuffer} buffer
 * @param {number} [expectedKind]
 * @param {Float32Array} [into] reused output (must hold the frame's samples)
 * @returns {Float32Array|null} null when the kind byte or length is wrong
 */
export function decodeAudioFrame(buffer, expectedKind = KIND_SERVER_AUDIO, into = undefined) {
  if (!(buffer instanceof ArrayBuffer) || buffer.byteLength < 3 || (buffer.byteLength - 1) % 2 !== 0) {
    return null;
  }
  const view = new DataView(buffer);
  if (view.getUint8(0) !== expectedKind) return null;
  const count = (buffer.byteLength - 1) / 2;
  const samples = into && into.length >= count ? into.subarray(0, count) : new Float32Array(count);
  for (let i = 0; i < count; i++) samples[i] = int16ToFloat(view.getInt16(1 + 2 * i, true));
  return samples;
}

/** Is `buffer` a complete server audio frame (kind 0x02, 961 bytes)? Cheap check for the main thread. */
export function isServerAudioFrame(buffer) {
  return (
    buffer instanceof ArrayBuffer &&
    buffer.byteLength === SERVER_FRAME_BYTES &&
    new Uint8Array(buffer, 0, 1)[0] === KIND_SERVER_AUDIO
  );
}

/**
 * Collects float samples arriving in arbitrary chunk sizes (e.g. a worklet's 128-sample render quanta
 * after resampling) into complete client frames, written as int16 directly into each frame's buffer.
 */
export class FrameAssembler {
  /**
   * @param {(frame: ArrayBuffer) => void} onFrame called with each complete frame (ownership passes on)
   * @param {{samplesPerFrame?: number, kind?: number}} [options]
   */
  constructor(onFrame, { samplesPerFrame = CLIENT_FRAME_SAMPLES, kind = KIND_CLIENT_AUDIO } = {}) {
    this.onFrame = onFrame;
    this.samplesPerFrame = samplesPerFrame;
    this.kind = kind;
    this.framesEmitted = 0;
    this.startFrame();
  }

  startFrame() {
    this.buffer = new ArrayBuffer(1 + 2 * this.samplesPerFrame);
    this.view = new DataView(this.buffer);
    this.view.setUint8(0, this.kind);
    this.filled = 0;
  }

  /** Add `count` samples from `samples` (default: all of it). */
  push(samples, count = samples.length) {
    for (let i = 0; i < count; i++) {
      this.view.setInt16(1 + 2 * this.filled, floatToInt16(samples[i]), true);
      if (++this.filled === this.samplesPerFrame) {
        const frame = this.buffer;
        this.framesEmitted++;
        this.startFrame();
        this.onFrame(frame);
      }
    }
  }

  /** Drop a partly filled frame (e.g. when capture restarts). */
  clear() {
    this.filled = 0;
  }
}

/**
 * Parse a JSON text frame. Returns the message object, or null when it is not JSON or has no string
 * "type" — the page ignores such frames rather than failing.
 */
export function parseControlMessage(text) {
  let message;
  try {
    message = JSON.parse(text);
  } catch {
    return null;
  }
  if (message === null || typeof message !== 'object' || typeof message.type !== 'string') return null;
  return message;
}

export function pingMessage(id, tMs) {
  return JSON.stringify({ type: 'ping', id, t_ms: tMs });
}

/** The answer to a server ping: echoes its id and t_ms. */
export function pongMessage(ping) {
  return JSON.stringify({ type: 'pong', id: ping.id, t_ms: ping.t_ms });
}

export function clientSessionEndMessage() {
  return JSON.stringify({ type: 'session_end', reason: 'client_request' });
}

/** ws: for an http: page, wss: for an https: page; same host and port. */
export function webSocketUrl(pageUrl, path = '/ws') {
  const page = new URL(pageUrl);
  const url = new URL(path, pageUrl);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.hash = '';
  url.search = '';
  // A server that wants a token gets the page's own (?token=...): browsers cannot set WebSocket headers.
  const token = page.searchParams.get('token');
  if (token) url.searchParams.set('token', token);
  // ?codec=opus asks the server for Opus (lib/opus.js; the connection drops it where WebCodecs is missing).
  if (page.searchParams.get('codec') === 'opus') url.searchParams.set('codec', 'opus');
  return url.toString();
}
