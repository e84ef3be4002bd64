// Playback AudioWorklet: 24 kHz frames from the server -> adaptive jitter buffer -> the audio device.
//
// Frames arrive as transferred 961-byte ArrayBuffers (0x02 + 480 int16 samples). When the context does
// not run at 24 kHz each frame is resampled on arrival (one stateful resampler, frames in order), so the
// jitter buffer works at the device rate and the render callback only copies.
//
// Messages in:  ArrayBuffer frames; {type: 'reset'} (new session: empty the buffer, restart adaptation).
// Messages out: {type: 'stats', ...JitterBuffer.stats(), framesReceived, badFrames, sampleRate} about four
//               times a second.

import { JitterBuffer } from '../lib/jitter.js';
import { KIND_SERVER_AUDIO, SERVER_FRAME_SAMPLES, SERVER_RATE, decodeAudioFrame } from '../lib/protocol.js';
import { StreamingResampler } from '../lib/resampler.js';

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const settings = options?.processorOptions ?? {};
    const inputRate = settings.inputRate ?? SERVER_RATE;
    const outputRate = Math.round(sampleRate);
    this.resampler = inputRate === outputRate ? null : new StreamingResampler(inputRate, outputRate);
    this.decoded = new Float32Array(SERVER_FRAME_SAMPLES);
    this.resampled = new Float32Array(this.resampler ? this.resampler.maxOutput(SERVER_FRAME_SAMPLES) : 0);
    this.jitter = new JitterBuffer(sampleRate, settings.jitter ?? {});
    this.statsInterval = Math.round(sampleRate / (settings.statsPerSecond ?? 4));
    this.sinceStats = 0;
    this.framesReceived = 0;
    this.badFrames = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(data) {
    if (data instanceof ArrayBuffer) {
      const samples = decodeAudioFrame(data, KIND_SERVER_AUDIO, this.decoded);
      if (samples === null) {
        this.badFrames++;
        return;
      }
      this.framesReceived++;
      if (this.resampler === null) {
        this.jitter.push(samples);
      } else {
        if (this.resampled.length < this.resampler.maxOutput(samples.length)) {
          this.resampled = new Float32Array(this.resampler.maxOutput(samples.length));
        }
        this.jitter.push(this.resampled, this.resampler.process(samples, this.resampled));
      }
    } else if (data?.type === 'reset') {
      this.jitter.reset();
      this.resampler?.reset();
      this.framesReceived = 0;
      this.badFrames = 0;
      this.sinceStats = this.statsInterval; // report the empty state at once
    }
  }

  process(inputs, outputs) {
    const channels = outputs[0];
    if (channels === undefined || channels.length === 0) return true;
    this.jitter.pull(channels[0]);
    for (let c = 1; c < channels.length; c++) channels[c].set(channels[0]);
    this.sinceStats += channels[0].length;
    if (this.sinceStats >= this.statsInterval) {
      this.sinceStats = 0;
      this.port.postMessage({
        type: 'stats',
        ...this.jitter.stats(),
        framesReceived: this.framesReceived,
        badFrames: this.badFrames,
        sampleRate,
      });
    }
    return true;
  }
}

registerProcessor('playback-processor', PlaybackProcessor);
