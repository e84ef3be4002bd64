// The pure parts of web/lib/opus.js: the switch, the frames, the rate change and the cutter. The codec
// itself is WebCodecs', which only a browser has: tests/test_opus_browser.py drives it in Chromium.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  ENCODER_CONFIG,
  FrameCutter,
  KIND_CLIENT_OPUS,
  MAX_OPUS_PACKET_BYTES,
  encodeOpusFrame,
  opusPacketOf,
  opusRequested,
  opusSupported,
  toServerRate,
  withoutCodec,
} from '../../web/lib/opus.js';
import { KIND_SERVER_AUDIO, SERVER_FRAME_BYTES, decodeAudioFrame, webSocketUrl } from '../../web/lib/protocol.js';

describe('the switch', () => {
  test('?codec=opus on the page asks the socket for Opus; nothing else does', () => {
    assert.equal(opusRequested('http://h/?codec=opus'), true);
    assert.equal(opusRequested('http://h/?codec=pcm'), false);
    assert.equal(opusRequested('http://h/'), false);
    assert.equal(opusRequested('not a url'), false);
    assert.equal(webSocketUrl('https://h/?codec=opus&token=t'), 'wss://h/ws?token=t&codec=opus');
    assert.equal(webSocketUrl('http://h/?codec=mp3'), 'ws://h/ws');
    assert.equal(withoutCodec('ws://h/ws?token=t&codec=opus'), 'ws://h/ws?token=t');
  });

  test('no WebCodecs, or a refusal, means PCM', async () => {
    assert.equal(await opusSupported(undefined, undefined), false);
    const yes = { isConfigSupported: async () => ({ supported: true }) };
    const no = { isConfigSupported: async () => ({ supported: false }) };
    const throws = { isConfigSupported: async () => { throw new TypeError('bad config'); } };
    assert.equal(await opusSupported(yes, yes), true);
    assert.equal(await opusSupported(yes, no), false);
    assert.equal(await opusSupported(throws, yes), false);
    assert.equal(ENCODER_CONFIG.opus.frameDuration, 20000); // one packet per 20 ms capture frame
  });
});

describe('frames', () => {
  test('0x03 + packet up; 0x04 + 1..1275 bytes down', () => {
    const frame = new Uint8Array(encodeOpusFrame(new Uint8Array([7, 8, 9])));
    assert.deepEqual([...frame], [KIND_CLIENT_OPUS, 7, 8, 9]);
    const down = new Uint8Array([0x04, 1, 2]).buffer;
    assert.deepEqual([...opusPacketOf(down)], [1, 2]);
    assert.equal(opusPacketOf(new Uint8Array([0x04]).buffer), null); // no packet
    assert.equal(opusPacketOf(new Uint8Array([0x02, 1]).buffer), null); // PCM
    assert.equal(opusPacketOf(new Uint8Array(MAX_OPUS_PACKET_BYTES + 2).fill(4).buffer), null);
    assert.equal(opusPacketOf('text'), null);
  });

  test('48 kHz decoder output becomes 24 kHz exactly; other rates are interpolated', () => {
    const at48 = Float32Array.from({ length: 960 }, (_, i) => i / 960);
    const at24 = toServerRate(at48, 48000);
    assert.equal(at24.length, 480);
    assert.equal(at24[10], at48[20]);
    assert.equal(toServerRate(at24, 24000), at24);
    const at16 = Float32Array.from({ length: 320 }, (_, i) => i);
    const up = toServerRate(at16, 16000);
    assert.equal(up.length, 480);
    assert.ok(Math.abs(up[3] - 2) < 1e-6); // sample 3 at 24 kHz is sample 2 at 16 kHz
  });

  test('the cutter gives whole 0x02 frames and keeps the rest for the next push', () => {
    const frames = [];
    const cutter = new FrameCutter((frame) => frames.push(frame));
    cutter.push(new Float32Array(700).fill(0.5));
    assert.equal(frames.length, 1);
    cutter.push(new Float32Array(260).fill(0.5));
    assert.equal(frames.length, 2);
    assert.ok(frames.every((f) => f.byteLength === SERVER_FRAME_BYTES));
    assert.ok(decodeAudioFrame(frames[1], KIND_SERVER_AUDIO).every((v) => Math.abs(v - 0.5) < 1e-4));
    cutter.push(new Float32Array(100));
    cutter.reset();
    cutter.push(new Float32Array(400));
    assert.equal(frames.length, 2); // what was pending before the reset is gone
  });
});
