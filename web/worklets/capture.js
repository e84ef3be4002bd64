// Capture AudioWorklet: microphone at the context's rate -> 16 kHz int16 frames of 20 ms.
//
// Runs on the audio rendering thread. Each render quantum is mixed to mono, resampled (streaming,
// anti-aliased) to 16 kHz and written into the current frame's buffer; every complete 641-byte frame
// (0x01 + 320 samples) is posted to the page as a transferred ArrayBuffer, ready for ws.send() as it is.
//
// Messages in:  {type: 'pause'} / {type: 'resume'} (drops audio while paused), {type: 'reset'}.
// Messages out: ArrayBuffer frames, and once at start {type: 'info', sampleRate, resamplerDelayMs}.
//               With processorOptions.probe: {type: 'probe', kind: 'capture', ...} batches (lib/probe.js):
//               the 16 kHz samples each render quantum produced for the frames, with its wall time.

import { CLIENT_RATE, FrameAssembler } from '../lib/protocol.js';
import { ProbeTrace } from '../lib/probe.js';
import { StreamingResampler } from '../lib/resampler.js';

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const targetRate = options?.processorOptions?.targetRate ?? CLIENT_RATE;
    // `sampleRate` is the rendering context's rate, a global of AudioWorkletGlobalScope (a float type,
    // an integer in practice).
    this.resampler = new StreamingResampler(Math.round(sampleRate), targetRate);
    this.mono = new Float32Array(128);
    this.resampled = new Float32Array(this.resampler.maxOutput(128));
    this.paused = false;
    this.assembler = new FrameAssembler((frame) => this.port.postMessage(frame, [frame]));
    this.port.onmessage = (event) => this.onControl(event.data);
    // The mouth-to-ear probe (lib/probe.js): null unless the page asked for it.
    this.probe = options?.processorOptions?.probe ? new ProbeTrace(this.port, 'capture', targetRate) : null;
    this.port.postMessage({
      type: 'info',
      sampleRate,
      targetRate,
      resamplerDelayMs: (1000 * this.resampler.delayInputSamples) / sampleRate,
    });
  }

  onControl(message) {
    if (message?.type === 'pause') this.paused = true;
    else if (message?.type === 'resume') this.paused = false;
    else if (message?.type === 'reset') {
      this.resampler.reset();
      this.assembler.clear();
    }
  }

  process(inputs) {
    const channels = inputs[0];
    if (this.paused || channels === undefined || channels.length === 0) return true;
    const frames = channels[0].length;
    let mono = channels[0];
    if (channels.length > 1) {
      // The node asks for one channel, but mix anyway should a browser hand over more.
      if (this.mono.length < frames) this.mono = new Float32Array(frames);
      mono = this.mono.subarray(0, frames);
      mono.fill(0);
      const weight = 1 / channels.length;
      for (const channel of channels) for (let i = 0; i < frames; i++) mono[i] += channel[i] * weight;
    }
    if (this.resampled.length < this.resampler.maxOutput(frames)) {
      this.resampled = new Float32Array(this.resampler.maxOutput(frames));
    }
    const count = this.resampler.process(mono, this.resampled);
    // Recorded before the push: a sample is timed from when it enters its frame, so that the wait for the
    // frame to fill (the budget's "worklet" row) is part of what the probe measures.
    if (this.probe !== null) this.probe.call(currentFrame, this.resampled, count);
    this.assembler.push(this.resampled, count);
    return true;
  }
}

registerProcessor('capture-processor', CaptureProcessor);
