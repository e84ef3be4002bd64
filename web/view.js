// DOM updates for the page. Writes text and attributes only (no layout reads), and only when a value
// changed, so the once-a-few-times-a-second refresh costs next to nothing. Every interface text comes from
// i18n.js; `applyLanguage` re-renders all of it in the other language.

import { language, otherLanguage, setLanguage, t, warningText } from './i18n.js';
import { formatTotal } from './lib/latency.js';

const known = (value) => typeof value === 'number' && Number.isFinite(value);

function ms(value, digits = 0) {
  return known(value) ? `${value.toFixed(digits)} ms` : '—';
}

function fixed(value, digits, unit) {
  return known(value) ? `${value.toFixed(digits)} ${unit}` : '—';
}

function count(value) {
  return known(value) ? String(Math.round(value)) : '—';
}

/** A status or notice: a fixed text, or a function giving it in the interface language now. */
function textOf(message) {
  return typeof message === 'function' ? message() : (message ?? '');
}

// The level meter's scale, dBFS: anything quieter reads as empty.
const METER_FLOOR_DB = -60;

export class View {
  /** @param {Document} doc */
  constructor(doc) {
    const byId = (id) => doc.getElementById(id);
    this.doc = doc;
    this.startButton = byId('start');
    this.stopButton = byId('stop');
    this.langToggle = byId('lang-toggle');
    this.status = byId('status');
    this.demoBanner = byId('demo-banner');
    this.speaking = byId('speaking');
    this.speakingLabel = byId('speaking-label');
    this.transcript = byId('transcript');
    this.transcriptEmpty = byId('transcript-empty');
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
      codec: byId('info-codec'),
      frames: byId('info-frames'),
      reconnects: byId('info-reconnects'),
      rates: byId('info-rates'),
    };
    this.quality = {
      meter: byId('q-level-meter'),
      level: byId('q-level'),
      levelDetail: byId('q-level-detail'),
      snr: byId('q-snr'),
      loss: byId('q-loss'),
      spikes: byId('q-spikes'),
      drops: byId('q-drops'),
      summary: byId('q-summary'),
      warnings: byId('q-warnings'),
    };
    this.parts = byId('lat-parts');
    this.partsKey = '';
    this.warningsKey = '';
    this.statusMessage = () => t('status.idle');
    this.demoNotice = false;
    this.isSpeaking = false;
    this.lastSnapshot = null;
  }

  setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  /** Show every interface text in `lang` ('te' or 'en'), and mark the document with it. */
  applyLanguage(lang) {
    setLanguage(lang);
    const doc = this.doc;
    doc.documentElement.lang = lang;
    for (const element of doc.querySelectorAll('[data-i18n]')) {
      this.setText(element, t(element.dataset.i18n));
    }
    for (const element of doc.querySelectorAll('[data-i18n-aria-label]')) {
      element.setAttribute('aria-label', t(element.dataset.i18nAriaLabel));
    }
    // The toggle offers the other language, in that language.
    const other = otherLanguage(lang);
    this.langToggle.lang = other;
    this.setText(this.langToggle, t('lang.name', {}, other));
    this.langToggle.title = t('lang.offer', {}, other);
    this.setText(this.status, textOf(this.statusMessage));
    this.setText(this.demoBanner, this.demoNotice ? t('demo.notice') : '');
    this.setText(this.speakingLabel, t(this.isSpeaking ? 'speaking.yes' : 'speaking.no'));
    this.renderMetrics(this.lastSnapshot);
  }

  get language() {
    return language();
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
   * @param {string|(() => string)} message the text, or a function giving it in the interface language
   * @param {'idle'|'starting'|'connecting'|'live'|'reconnecting'|'error'|'stopped'} state
   */
  setStatus(message, state) {
    this.statusMessage = message;
    this.setText(this.status, textOf(message));
    this.status.dataset.state = state;
  }

  /** @param {boolean} demo whether the server runs the demo checkpoint (random weights) */
  setDemo(demo) {
    this.demoNotice = Boolean(demo);
    this.demoBanner.hidden = !this.demoNotice;
    this.setText(this.demoBanner, this.demoNotice ? t('demo.notice') : '');
  }

  setSpeaking(speaking) {
    const value = speaking ? 'true' : 'false';
    if (this.speaking.dataset.speaking === value) return;
    this.isSpeaking = speaking;
    this.speaking.dataset.speaking = value;
    this.setText(this.speakingLabel, t(speaking ? 'speaking.yes' : 'speaking.no'));
  }

  appendTranscript(text) {
    const box = this.transcript;
    this.transcriptEmpty.hidden = true;
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
    this.transcriptEmpty.hidden = false;
  }

  /** Refresh the latency monitor, the quality panel and the session details from a plain snapshot (see
   * VoiceAgent.snapshot); null: nothing known yet. */
  renderMetrics(s) {
    this.lastSnapshot = s;
    const f = this.fields;
    this.setText(f.rtt, ms(s?.rttMs));
    const rttDetail =
      s?.rttMinMs == null
        ? t('latency.rttWaiting')
        : t('latency.rttDetail', { min: ms(s.rttMinMs), last: ms(s.rttLastMs) });
    this.setText(f.rttDetail, rttDetail);
    this.setText(f.server, ms(s?.serverMs, 1));
    const b = s?.serverBreakdown;
    this.setText(
      f.serverParts,
      t('latency.serverParts', {
        queue: ms(b?.queue_ms, 1),
        step: ms(b?.step_ms, 1),
        resample: ms(b?.resample_ms, 1),
        transport: ms(b?.transport_ms, 1),
        p99: ms(s?.serverP99Ms, 1),
        dropped: s?.serverDroppedFrames ?? '—',
      }),
    );
    this.setText(f.buffer, ms(s?.bufferMs));
    this.setText(
      f.bufferDetail,
      t('latency.bufferDetail', {
        target: ms(s?.bufferTargetMs),
        underruns: s?.underruns ?? '—',
        played: s?.framesPlayed ?? '—',
      }),
    );
    const estimate = s?.estimate;
    this.setText(f.total, estimate ? formatTotal(estimate) : '—');
    this.renderParts(estimate);
    this.setText(f.session, s?.sessionId || '—');
    this.setText(f.model, s?.model || '—');
    this.setText(f.codec, s?.codec || '—');
    this.setText(f.frames, s ? `${s.framesSent} / ${s.framesReceived} / ${s.framesPlayed}` : '—');
    this.setText(f.reconnects, String(s?.reconnects ?? 0));
    this.setText(f.rates, s?.rates ? `${s.rates.capture} Hz / ${s.rates.playback} Hz` : '—');
    this.renderQuality(s?.quality ?? null);
  }

  renderParts(estimate) {
    const items = (estimate?.parts ?? []).map((part) => {
      const key = `part.${part.key}`;
      const name = t(key) === key ? part.label : t(key); // a part newer than the tables: its English label
      return `${name} ${part.ms === null ? '?' : Math.round(part.ms)} ms`;
    });
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

  /** The quality panel from `latency.quality` as lib/stats.js readQuality checked it; null: "—". */
  renderQuality(quality) {
    const q = this.quality;
    const level = quality?.levelDbfs;
    q.meter.value = known(level) ? Math.max(METER_FLOOR_DB, Math.min(0, level)) : METER_FLOOR_DB;
    this.setText(q.level, fixed(level, 0, 'dBFS'));
    this.setText(
      q.levelDetail,
      quality
        ? t('quality.levelDetail', {
            peak: fixed(quality.peakDbfs, 0, 'dBFS'),
            clipped: fixed(quality.clippedPct, 1, '%'),
          })
        : '—',
    );
    this.setText(q.snr, fixed(quality?.snrDb, 0, 'dB'));
    this.setText(q.loss, fixed(quality?.inputLossPct, 1, '%'));
    this.setText(q.spikes, count(quality?.spikes));
    this.setText(q.drops, count(quality?.outputDropped));
    const warnings = Array.isArray(quality?.warnings) ? quality.warnings : [];
    this.setText(q.summary, !quality ? '—' : warnings.length === 0 ? t('quality.ok') : '');
    q.summary.hidden = Boolean(quality) && warnings.length > 0;
    const items = warnings.map((warning) => [String(warning), warningText(warning)]);
    const key = `${language()}|${items.map(([name]) => name).join('|')}`;
    if (key === this.warningsKey) return;
    this.warningsKey = key;
    q.warnings.replaceChildren(
      ...items.map(([name, text]) => {
        const li = this.doc.createElement('li');
        li.dataset.warning = name;
        li.textContent = text;
        return li;
      }),
    );
  }
}
