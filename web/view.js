// DOM updates for the page. Writes text and attributes only (no layout reads), and only when a value
// changed, so the once-a-few-times-a-second refresh costs next to nothing.

import { formatTotal } from './lib/latency.js';

function ms(value, digits = 0) {
  return typeof value === 'number' && Number.isFinite(value) ? `${value.toFixed(digits)} ms` : '—';
}

export class View {
  /** @param {Document} doc */
  constructor(doc) {
    const byId = (id) => doc.getElementById(id);
    this.doc = doc;
    this.startButton = byId('start');
    this.stopButton = byId('stop');
    this.status = byId('status');
    this.demoBanner = byId('demo-banner');
    this.speaking = byId('speaking');
    this.speakingLabel = byId('speaking-label');
    this.transcript = byId('transcript');
    this.fields = {
      rtt: byId('lat-rtt'),
      rttDetail: byId('lat-rtt-detail'),
      server: byId('lat-server'),
      serverParts: byId('lat-server-parts'),
      buffer: byId('lat-buffer'),
      bufferDetail: byId('lat-buffer-detail'),
      total: byId('lat-total'),
      session: byId('info-session'),
      model: byId('info-model'),
      frames: byId('info-frames'),
      reconnects: byId('info-reconnects'),
      rates: byId('info-rates'),
    };
    this.parts = byId('lat-parts');
    this.partsKey = '';
  }

  setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  setRunning(running) {
    this.startButton.disabled = running;
    this.stopButton.disabled = !running;
    // Keep keyboard focus on a usable control when the focused one becomes disabled.
    const focused = this.doc.activeElement;
    if (running && focused === this.startButton) this.stopButton.focus();
    if (!running && focused === this.stopButton) this.startButton.focus();
  }

  /**
   * @param {string} text
   * @param {'idle'|'starting'|'connecting'|'live'|'reconnecting'|'error'|'stopped'} state
   */
  setStatus(text, state) {
    this.setText(this.status, text);
    this.status.dataset.state = state;
  }

  setDemo(notice) {
    this.demoBanner.hidden = !notice;
    this.setText(this.demoBanner, notice ?? '');
  }

  setSpeaking(speaking) {
    const value = speaking ? 'true' : 'false';
    if (this.speaking.dataset.speaking === value) return;
    this.speaking.dataset.speaking = value;
    this.setText(this.speakingLabel, speaking ? 'You: speaking' : 'You: silent');
  }

  appendTranscript(text) {
    const box = this.transcript;
    // Follow the text only if the reader has not scrolled up to read something earlier.
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    box.append(text);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  /** A visual break between the transcripts of two sessions (after a reconnect). */
  transcriptBreak() {
    if (!this.transcript.hasChildNodes()) return;
    const separator = this.doc.createElement('span');
    separator.className = 'separator';
    separator.setAttribute('aria-hidden', 'true');
    this.transcript.append(separator);
  }

  clearTranscript() {
    this.transcript.replaceChildren();
  }

  /** Refresh the latency monitor and session details from a plain snapshot (see VoiceAgent.snapshot). */
  renderMetrics(s) {
    const f = this.fields;
    this.setText(f.rtt, ms(s.rttMs));
    const rttDetail =
      s.rttMinMs === null
        ? 'ping/pong once a second'
        : `smoothed · min ${ms(s.rttMinMs)} · last ${ms(s.rttLastMs)}`;
    this.setText(f.rttDetail, rttDetail);
    this.setText(f.server, ms(s.serverMs, 1));
    const b = s.serverBreakdown;
    this.setText(
      f.serverParts,
      `queue ${ms(b?.queue_ms, 1)} · step ${ms(b?.step_ms, 1)} · resample ${ms(b?.resample_ms, 1)} · ` +
        `transport ${ms(b?.transport_ms, 1)} · p99 ${ms(s.serverP99Ms, 1)} · ` +
        `dropped ${s.serverDroppedFrames ?? '—'}`,
    );
    this.setText(f.buffer, ms(s.bufferMs));
    this.setText(
      f.bufferDetail,
      `target ${ms(s.bufferTargetMs)} · underruns ${s.underruns} · played ${s.framesPlayed} frames`,
    );
    const estimate = s.estimate;
    this.setText(f.total, estimate ? formatTotal(estimate) : '—');
    this.renderParts(estimate);
    this.setText(f.session, s.sessionId || '—');
    this.setText(f.model, s.model || '—');
    this.setText(f.frames, `${s.framesSent} / ${s.framesReceived} / ${s.framesPlayed}`);
    this.setText(f.reconnects, String(s.reconnects));
    this.setText(f.rates, s.rates ? `${s.rates.capture} Hz / ${s.rates.playback} Hz` : '—');
  }

  renderParts(estimate) {
    const items = (estimate?.parts ?? []).map(
      (part) => `${part.label} ${part.ms === null ? '?' : Math.round(part.ms)} ms`,
    );
    const key = items.join('|');
    if (key === this.partsKey) return;
    this.partsKey = key;
    this.parts.replaceChildren(
      ...items.map((text) => {
        const li = this.doc.createElement('li');
        li.textContent = text;
        return li;
      }),
    );
  }
}
