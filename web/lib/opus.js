// Opus on the wire (the page opened with ?codec=opus): WebCodecs' AudioEncoder/AudioDecoder where the
// browser has them, PCM where it does not (decided by itself, before the first connect).
//
// The server's side: /ws?codec=opus, then `session_start` names "opus" in `input`/`output`; one Opus packet
// per 20 ms frame, 0x03 + packet up (16 kHz mono), 0x04 + packet down (24 kHz mono). Everything around
// this stays PCM: the capture worklet's 0x01 frames are encoded here, and what the decoder gives is turned
// back into the 0x02 frames the playback worklet already takes, so neither worklet knows about Opus.

import {
  CLIENT_RATE,
  KIND_CLIENT_AUDIO,
  KIND_SERVER_AUDIO,
  SERVER_FRAME_SAMPLES,
  SERVER_RATE,
  decodeAudioFrame,
  encodeAudioFrame,
} from './protocol.js';

export const KIND_CLIENT_OPUS = 0x03;
export const KIND_SERVER_OPUS = 0x04;
/** RFC 6716 §3.2.1: the largest packet of one Opus frame; the server refuses more. */
export const MAX_OPUS_PACKET_BYTES = 1275;
/** Wideband speech from the microphone; the server sends its 24 kHz speech at 32 kbit/s. */
export const OPUS_UP_BITRATE = 24000;

export const ENCODER_CONFIG = Object.freeze({
  codec: 'opus',
  sampleRate: CLIENT_RATE,
  numberOfChannels: 1,
  bitrate: OPUS_UP_BITRATE,
  opus: { frameDuration: 20000, application: 'voip' }, // one packet per capture frame
});
export const DECODER_CONFIG = Object.freeze({ codec: 'opus', sampleRate: SERVER_RATE, numberOfChannels: 1 });

/** Does this (page or socket) URL ask for Opus (?codec=opus)? */
export function opusRequested(url) {
  try {
    return new URL(url).searchParams.get('codec') === 'opus';
  } catch {
    return false;
  }
}

/** The URL without its codec parameter: what a browser without WebCodecs connects to (PCM). */
export function withoutCodec(url) {
  const parsed = new URL(url);
  parsed.searchParams.delete('codec');
  return parsed.toString();
}

/** Can this browser encode 16 kHz and decode 24 kHz mono Opus? Never rejects. */
export async function opusSupported(Encoder = globalThis.AudioEncoder, Decoder = globalThis.AudioDecoder) {
  if (typeof Encoder?.isConfigSupported !== 'function' || typeof Decoder?.isConfigSupported !== 'function') {
    return false;
  }
  try {
    const [up, down] = await Promise.all([
      Encoder.isConfigSupported(ENCODER_CONFIG),
      Decoder.isConfigSupported(DECODER_CONFIG),
    ]);
    return Boolean(up?.supported && down?.supported);
  } catch {
    return false;
  }
}

/** 0x03 + one packet, as an ArrayBuffer for the socket. */
export function encodeOpusFrame(packet) {
  const frame = new Uint8Array(1 + packet.byteLength);
  frame[0] = KIND_CLIENT_OPUS;
  frame.set(packet, 1);
  return frame.buffer;
}

/** The packet of a server Opus frame (0x04 + 1..1275 bytes), or null if it is not one. */
export function opusPacketOf(buffer) {
  const size = buffer instanceof ArrayBuffer ? buffer.byteLength : 0;
  if (size < 2 || size > MAX_OPUS_PACKET_BYTES + 1) return null;
  const bytes = new Uint8Array(buffer);
  return bytes[0] === KIND_SERVER_OPUS ? bytes.subarray(1) : null;
}

/**
 * Decoded audio at `rate` -> samples at 24 kHz. Chromium's decoder gives 48 kHz whatever it was asked for;
 * what the server encoded at 24 kHz has nothing above 12 kHz, so every other sample is exact. Any other
 * rate is interpolated linearly (a fallback that no browser we test needs).
 */
export function toServerRate(samples, rate) {
  if (rate === SERVER_RATE) return samples;
  const count = Math.round((samples.length * SERVER_RATE) / rate);
  const out = new Float32Array(count);
  if (rate === 2 * SERVER_RATE) {
    for (let i = 0; i < count; i++) out[i] = samples[2 * i];
    return out;
  }
  const step = rate / SERVER_RATE;
  for (let i = 0; i < count; i++) {
    const x = i * step;
    const j = Math.floor(x);
    const next = j + 1 < samples.length ? samples[j + 1] : samples[j];
    out[i] = samples[j] + (next - samples[j]) * (x - j);
  }
  return out;
}

/** Cuts decoded audio of any length into 20 ms 0x02 frames, as the playback worklet takes them. */
export class FrameCutter {
  constructor(onFrame) {
    this.onFrame = onFrame;
    this.pending = new Float32Array(0);
  }

  push(samples) {
    const all = new Float32Array(this.pending.length + samples.length);
    all.set(this.pending);
    all.set(samples, this.pending.length);
    let at = 0;
    for (; at + SERVER_FRAME_SAMPLES <= all.length; at += SERVER_FRAME_SAMPLES) {
      this.onFrame(encodeAudioFrame(all.subarray(at, at + SERVER_FRAME_SAMPLES), KIND_SERVER_AUDIO));
    }
    this.pending = all.slice(at);
  }

  reset() {
    this.pending = new Float32Array(0);
  }
}

/**
 * One connection's Opus: `encode(0x01 frame)` -> `onPacket(0x03 frame)`; `decode(0x04 frame)` ->
 * `onFrame(0x02 frame)`. `onError` hears a codec failure (the caller falls back to PCM).
 */
export class OpusLink {
  constructor({ onPacket, onFrame, onError = () => {}, Encoder = globalThis.AudioEncoder,
    Decoder = globalThis.AudioDecoder, EncodedChunk = globalThis.EncodedAudioChunk,
    Data = globalThis.AudioData }) {
    Object.assign(this, { onPacket, onFrame, onError, Encoder, Decoder, EncodedChunk, Data });
    /** null until detect() ran; then whether this browser can speak Opus. */
    this.supported = null;
    this.encoder = null;
    this.decoder = null;
    this.cutter = new FrameCutter((frame) => this.onFrame(frame));
    this.sent = 0;
    this.received = 0;
  }

  async detect() {
    this.supported = await opusSupported(this.Encoder, this.Decoder);
    return this.supported;
  }

  get active() {
    return this.encoder !== null;
  }

  /** A session began that speaks Opus: fresh codec state (a packet never depends on another session's). */
  begin() {
    this.end();
    const fail = (error) => this.onError(error);
    this.encoder = new this.Encoder({
      output: (chunk) => {
        const packet = new Uint8Array(chunk.byteLength);
        chunk.copyTo(packet);
        this.onPacket(encodeOpusFrame(packet));
      },
      error: fail,
    });
    this.encoder.configure(ENCODER_CONFIG);
    this.decoder = new this.Decoder({
      output: (data) => {
        const samples = new Float32Array(data.numberOfFrames);
        data.copyTo(samples, { planeIndex: 0, format: 'f32-planar' });
        const rate = data.sampleRate;
        data.close();
        this.cutter.push(toServerRate(samples, rate));
      },
      error: fail,
    });
    this.decoder.configure(DECODER_CONFIG);
  }

  /** One 0x01 capture frame in; its packet comes out through onPacket (asynchronously). */
  encode(pcmFrame) {
    const samples = decodeAudioFrame(pcmFrame, KIND_CLIENT_AUDIO);
    if (samples === null || this.encoder?.state !== 'configured') return false;
    const data = new this.Data({
      format: 'f32',
      sampleRate: CLIENT_RATE,
      numberOfFrames: samples.length,
      numberOfChannels: 1,
      timestamp: this.sent * 20000, // microseconds
      data: samples,
    });
    this.encoder.encode(data);
    data.close();
    this.sent++;
    return true;
  }

  /** One 0x04 frame in; its 0x02 frame comes out through onFrame. False if it is not an Opus frame. */
  decode(buffer) {
    const packet = opusPacketOf(buffer);
    if (packet === null || this.decoder?.state !== 'configured') return false;
    const chunk = new this.EncodedChunk({ type: 'key', timestamp: this.received * 20000, data: packet });
    this.decoder.decode(chunk);
    this.received++;
    return true;
  }

  /** The session is over: drop the codec state (what is still queued in it is not wanted any more). */
  end() {
    for (const codec of [this.encoder, this.decoder]) {
      try {
        if (codec !== null && codec.state !== 'closed') codec.close();
      } catch {
        // Closing a codec that failed may throw; it is gone either way.
      }
    }
    this.encoder = null;
    this.decoder = null;
    this.cutter.reset();
    this.sent = 0;
    this.received = 0;
  }
}
