// The page's audio graph: microphone -> capture worklet (frames for the socket) and
// playback worklet (jitter buffer) -> speakers. Two AudioContexts, because their needs differ:
// - capture runs at the device's own rate (Firefox refuses to connect a microphone to a context of another
//   rate), and its worklet resamples to 16 kHz;
// - playback asks for 24 kHz, the server's rate, so that no resampling is needed; browsers that refuse get
//   their default rate and the playback worklet resamples.

import { CLIENT_RATE, SERVER_RATE } from './lib/protocol.js';

export const MICROPHONE_CONSTRAINTS = Object.freeze({
  audio: {
    channelCount: 1,
    echoCancellation: true,
    noiseSuppression: true,
    autoGainControl: true,
    sampleRate: CLIENT_RATE,
    latency: 0.01,
  },
});

function createPlaybackContext() {
  try {
    return new AudioContext({ sampleRate: SERVER_RATE, latencyHint: 'interactive' });
  } catch {
    return new AudioContext({ latencyHint: 'interactive' });
  }
}

function secondsToMs(value) {
  return typeof value === 'number' && Number.isFinite(value) ? value * 1000 : null;
}

export class AudioPipeline {
  /**
   * Construct inside the user's click (before any await): browsers let an AudioContext start only during
   * or after a user gesture, and creating it here keeps that link.
   * @param {{
   *   onCaptureFrame: (frame: ArrayBuffer) => void,
   *   onPlaybackStats: (stats: object) => void,
   *   onFailure: (what: string) => void,
   *   onProbe?: ((message: object) => void) | null,
   * }} handlers  onProbe: turns the worklets' mouth-to-ear probe on and receives its batches (lib/probe.js)
   */
  constructor({ onCaptureFrame, onPlaybackStats, onFailure, onProbe = null }) {
    this.onCaptureFrame = onCaptureFrame;
    this.onProbe = onProbe;
    this.onPlaybackStats = onPlaybackStats;
    this.onFailure = onFailure;
    this.playbackContext = createPlaybackContext();
    this.captureContext = new AudioContext({ latencyHint: 'interactive' });
    this.captureInfo = null;
    this.stream = null;
    this.captureNode = null;
    this.playbackNode = null;
    this.closed = false;
    this.resume();
  }

  /** Ask for the microphone, load the worklets and connect everything. Rejects as getUserMedia does. */
  async open() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw Object.assign(new Error('getUserMedia is not available on an insecure page'), {
        name: 'InsecureContext',
      });
    }
    const stream = await navigator.mediaDevices.getUserMedia(MICROPHONE_CONSTRAINTS);
    if (this.closed) {
      for (const track of stream.getTracks()) track.stop();
      return;
    }
    this.stream = stream;
    await Promise.all([
      this.captureContext.audioWorklet.addModule(new URL('./worklets/capture.js', import.meta.url)),
      this.playbackContext.audioWorklet.addModule(new URL('./worklets/playback.js', import.meta.url)),
    ]);
    if (this.closed) return;

    const capture = this.captureContext;
    const source = capture.createMediaStreamSource(stream);
    this.captureNode = new AudioWorkletNode(capture, 'capture-processor', {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: 'explicit',
      channelInterpretation: 'speakers',
      processorOptions: { targetRate: CLIENT_RATE, probe: this.onProbe !== null },
    });
    this.captureNode.onprocessorerror = () => this.onFailure('capture');
    this.captureNode.port.onmessage = (event) => {
      if (event.data instanceof ArrayBuffer) this.onCaptureFrame(event.data);
      else if (event.data?.type === 'info') this.captureInfo = event.data;
      else if (event.data?.type === 'probe') this.onProbe?.(event.data);
    };
    // A worklet is only run while something pulls on it: route it to the speakers through a muted gain.
    const mute = new GainNode(capture, { gain: 0 });
    source.connect(this.captureNode).connect(mute).connect(capture.destination);

    const playback = this.playbackContext;
    this.playbackNode = new AudioWorkletNode(playback, 'playback-processor', {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { inputRate: SERVER_RATE, statsPerSecond: 4, probe: this.onProbe !== null },
    });
    this.playbackNode.onprocessorerror = () => this.onFailure('playback');
    this.playbackNode.port.onmessage = (event) => {
      if (event.data?.type === 'stats') this.onPlaybackStats(event.data);
      else if (event.data?.type === 'probe') this.onProbe?.(event.data);
    };
    this.playbackNode.connect(playback.destination);
    this.resume();
  }

  /** Hand one 0x02 frame (transferred, so the caller must not touch it again) to the jitter buffer. */
  playFrame(frame) {
    this.playbackNode?.port.postMessage(frame, [frame]);
  }

  /** True while a browser's autoplay policy keeps either context from running. */
  get suspended() {
    return this.captureContext.state === 'suspended' || this.playbackContext.state === 'suspended';
  }

  resume() {
    // Without a user gesture (e.g. ?autostart=1) this can stay pending; the page offers a click then.
    for (const context of [this.captureContext, this.playbackContext]) {
      if (context.state === 'suspended') context.resume().catch(() => {});
    }
  }

  /** The audio-path parts of the mouth-to-ear estimate that the browser can tell us. */
  latencyInputs() {
    return {
      captureBaseLatencyMs: secondsToMs(this.captureContext.baseLatency),
      captureResamplerMs: this.captureInfo?.resamplerDelayMs ?? null,
      outputBaseLatencyMs: secondsToMs(this.playbackContext.baseLatency),
      outputLatencyMs: secondsToMs(this.playbackContext.outputLatency),
    };
  }

  get rates() {
    return { capture: this.captureContext.sampleRate, playback: this.playbackContext.sampleRate };
  }

  async close() {
    this.closed = true;
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.captureNode?.port.close();
    this.playbackNode?.port.close();
    await Promise.allSettled([this.captureContext.close(), this.playbackContext.close()]);
  }
}
