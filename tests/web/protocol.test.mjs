import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import {
  CLIENT_FRAME_BYTES,
  CLIENT_FRAME_SAMPLES,
  FrameAssembler,
  KIND_CLIENT_AUDIO,
  KIND_SERVER_AUDIO,
  SERVER_FRAME_BYTES,
  clientSessionEndMessage,
  decodeAudioFrame,
  encodeAudioFrame,
  floatToInt16,
  isServerAudioFrame,
  parseControlMessage,
  pingMessage,
  pongMessage,
  webSocketUrl,
} from '../../web/lib/protocol.js';
import { concat } from './helpers/signals.mjs';

describe('protocol', () => {
  test('frame sizes match the wire protocol', () => {
    assert.equal(CLIENT_FRAME_BYTES, 641);
    assert.equal(SERVER_FRAME_BYTES, 961);
    assert.equal(CLIENT_FRAME_SAMPLES, 320);
  });

  test('floats become int16 with rounding and clipping', () => {
    assert.equal(floatToInt16(0), 0);
    assert.equal(floatToInt16(0.5), 16384); // 16383.5 rounds up
    assert.equal(floatToInt16(-0.5), -16384);
    assert.equal(floatToInt16(1), 32767);
    assert.equal(floatToInt16(1.5), 32767);
    assert.equal(floatToInt16(-1.5), -32768);
  });

  test('a client frame is 0x01 then little-endian int16 samples', () => {
    const samples = new Float32Array(CLIENT_FRAME_SAMPLES);
    samples[0] = 0.5; // 16384 = 0x4000
    samples[1] = -1 / 32768; // -1 = 0xffff
    samples[319] = 256 / 32767; // 256 = 0x0100
    const frame = encodeAudioFrame(samples);
    assert.ok(frame instanceof ArrayBuffer);
    const bytes = new Uint8Array(frame);
    assert.equal(bytes.length, 641);
    assert.equal(bytes[0], KIND_CLIENT_AUDIO);
    assert.deepEqual([...bytes.subarray(1, 5)], [0x00, 0x40, 0xff, 0xff]);
    assert.deepEqual([...bytes.subarray(639, 641)], [0x00, 0x01]);
  });

  test('server frames decode to floats; wrong kinds and lengths are rejected', () => {
    const bytes = new Uint8Array(SERVER_FRAME_BYTES);
    bytes[0] = KIND_SERVER_AUDIO;
    bytes[1] = 0x00;
    bytes[2] = 0x40; // 16384
    bytes[3] = 0x00;
    bytes[4] = 0x80; // -32768
    const samples = decodeAudioFrame(bytes.buffer);
    assert.equal(samples.length, 480);
    assert.equal(samples[0], Math.fround(16384 / 32767));
    assert.equal(samples[1], -1);
    assert.ok(isServerAudioFrame(bytes.buffer));

    const wrongKind = bytes.slice();
    wrongKind[0] = KIND_CLIENT_AUDIO;
    assert.equal(decodeAudioFrame(wrongKind.buffer), null);
    assert.equal(isServerAudioFrame(wrongKind.buffer), false);
    assert.equal(decodeAudioFrame(bytes.slice(0, 960).buffer), null); // odd payload length
    assert.equal(decodeAudioFrame(new ArrayBuffer(1)), null);
    assert.equal(isServerAudioFrame(bytes.slice(0, 959).buffer), false);
    assert.equal(decodeAudioFrame('not a buffer'), null);
  });

  test('encode then decode round-trips within int16 resolution, into a reused buffer', () => {
    const samples = Float32Array.from({ length: 480 }, (_, i) => Math.sin(i / 7) * 0.9);
    const into = new Float32Array(480);
    const decoded = decodeAudioFrame(encodeAudioFrame(samples, KIND_SERVER_AUDIO), KIND_SERVER_AUDIO, into);
    assert.equal(decoded.buffer, into.buffer);
    for (let i = 0; i < 480; i++) assert.ok(Math.abs(decoded[i] - samples[i]) <= 0.5 / 32767 + 1e-7);
  });

  test('FrameAssembler turns odd-sized chunks into whole 641-byte frames, in order', () => {
    const frames = [];
    const assembler = new FrameAssembler((frame) => frames.push(frame));
    const signal = Float32Array.from({ length: 3 * 320 + 100 }, (_, i) => (i % 1000) / 1000);
    const sizes = [1, 45, 46, 128, 7, 300, 333];
    let at = 0;
    for (let k = 0; at < signal.length; k++) {
      const size = sizes[k % sizes.length];
      assembler.push(signal.subarray(at, at + size));
      at += size;
    }
    assert.equal(frames.length, 3);
    assert.equal(assembler.framesEmitted, 3);
    for (const frame of frames) {
      assert.equal(frame.byteLength, 641);
      assert.equal(new Uint8Array(frame)[0], KIND_CLIENT_AUDIO);
    }
    const decoded = concat(frames.map((f) => decodeAudioFrame(f, KIND_CLIENT_AUDIO)));
    for (let i = 0; i < decoded.length; i++) assert.ok(Math.abs(decoded[i] - signal[i]) < 1e-4);
    // Each frame has its own buffer (they are transferred away one by one).
    assert.notEqual(frames[0], frames[1]);
  });

  test('FrameAssembler.push honours an explicit count', () => {
    const frames = [];
    const assembler = new FrameAssembler((frame) => frames.push(frame));
    const chunk = new Float32Array(500).fill(0.25);
    assembler.push(chunk, 300);
    assert.equal(frames.length, 0);
    assembler.push(chunk, 20);
    assert.equal(frames.length, 1);
  });

  test('control messages: parse, ping, pong echo, session end', () => {
    assert.deepEqual(parseControlMessage('{"type":"vad","event":"start","t_ms":1.5}'), {
      type: 'vad',
      event: 'start',
      t_ms: 1.5,
    });
    assert.equal(parseControlMessage('not json'), null);
    assert.equal(parseControlMessage('[1,2]'), null);
    assert.equal(parseControlMessage('{"no":"type"}'), null);
    assert.equal(parseControlMessage('null'), null);
    assert.deepEqual(JSON.parse(pingMessage(3, 12.5)), { type: 'ping', id: 3, t_ms: 12.5 });
    assert.deepEqual(JSON.parse(pongMessage({ type: 'ping', id: 9, t_ms: 77.25 })), {
      type: 'pong',
      id: 9,
      t_ms: 77.25,
    });
    const end = JSON.parse(clientSessionEndMessage());
    assert.deepEqual(end, { type: 'session_end', reason: 'client_request' });
  });

  test('the socket URL follows the page: ws for http, wss for https, same host and port', () => {
    assert.equal(webSocketUrl('http://localhost:8998/'), 'ws://localhost:8998/ws');
    assert.equal(webSocketUrl('http://127.0.0.1:8998/index.html?autostart=1#x'), 'ws://127.0.0.1:8998/ws');
    assert.equal(webSocketUrl('https://agent.example.org/'), 'wss://agent.example.org/ws');
    // a token in the page's URL goes to the server, nothing else of its query does
    assert.equal(webSocketUrl('https://agent.example.org/?token=v1.9.ab&autostart=1'),
      'wss://agent.example.org/ws?token=v1.9.ab');
  });
});
