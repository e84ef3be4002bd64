// Playback AudioWorklet: 24 kHz frames from the server -> adaptive jitter buffer -> the audio device.
//
// Frames arrive as transferred 961-byte ArrayBuffers (0x02 + 480 int16 samples). When the context does
// not run at 24 kHz each frame is resampled on arrival (one stateful resampler, frames in order), so the
// jitter buffer works at the device rate and the render callback only copies.
//
// Messages in:  ArrayBuffer frames; {type: 'reset'} (new session: empty the buffer, restart adaptation).
// Messages out: {type: 'stats', ...JitterBuffer.stats(), framesReceived, badFrames, sampleRate,
//               arrivalBufferMs} about four times a second. arrivalBufferMs: the mean audio buffered when
//               a burst of frames landed (the first frame since the last render quantum) since the last
//               report (null if none landed): the server sends a block's frames together, so this is what
//               the first sample of a block waits behind, the playback buffer's share of mouth-to-ear
//               (lib/latency.js).
//               With processorOptions.probe: {type: 'probe', kind: 'playback', ...} batches (lib/probe.js):
//               every render quantum's output samples with its wall time, and a note per frame pushed into
//               the jitter buffer.

import { JitterBuffer } from '../lib/jitter.js';
import { ProbeTrace } from '../lib/probe.js';
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
    this.arrivalSumMs = 0;
    this.arrivals = 0;
    this.renderedSincePush = true;
    this.port.onmessage = (event) => this.onMessage(event.data);
    // The mouth-to-ear probe (lib/probe.js): null unless the page asked for it.
    this.probe = settings.probe ? new ProbeTrace(this.port, 'playback', outputRate) : null;
  }

  onMessage(data) {
    if (data instanceof ArrayBuffer) {
      const samples = decodeAudioFrame(data, KIND_SERVER_AUDIO, this.decoded);
      if (samples === null) {
        this.badFrames++;
        return;
      }
      this.framesReceived++;
      if (this.renderedSincePush) {
        this.renderedSincePush = false;
        this.arrivalSumMs += this.jitter.depthMs;
        this.arrivals++;
      }
      if (this.resampler === null) {
        this.jitter.push(samples);
      } else {
        if (this.resampled.length < this.resampler.maxOutput(samples.length)) {
          this.resampled = new Float32Array(this.resampler.maxOutput(samples.length));
        }
        this.jitter.push(this.resampled, this.resampler.process(samples, this.resampled));
      }
      // When each frame entered the buffer (and where, in pushed samples): its playout delay follows.
      if (this.probe !== null) this.probe.note(this.jitter.pushedSamples);
    } else if (data?.type === 'reset') {
      this.jitter.reset();
      this.resampler?.reset();
      this.framesReceived = 0;
      this.badFrames = 0;
      this.arrivalSumMs = 0;
      this.arrivals = 0;
      this.sinceStats = this.statsInterval; // report the empty state at once
    }
  }

  process(inputs, outputs) {
    const channels = outputs[0];
    if (channels === undefined || channels.length === 0) return true;
    this.jitter.pull(channels[0]);
    this.renderedSincePush = true;
    if (this.probe !== null) {
      // aux: the read position in pushed samples (consumed + dropped), to time each pushed frame's playout.
      const read = this.jitter.consumedSamples + this.jitter.droppedSamples;
      this.probe.call(currentFrame, channels[0], channels[0].length, read);
    }
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
        arrivalBufferMs: this.arrivals > 0 ? this.arrivalSumMs / this.arrivals : null,
      });
      this.arrivalSumMs = 0;
      this.arrivals = 0;
    }
    return true;
  }
}

registerProcessor('playback-processor', PlaybackProcessor);
