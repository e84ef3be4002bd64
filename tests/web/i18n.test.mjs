// The interface's string tables (web/i18n.js): Telugu and English say the same things, every key the page
// uses exists, and the status line's wording in both languages.
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  DEFAULT_LANGUAGE,
  LANGUAGES,
  STORAGE_KEY,
  STRINGS,
  audioFailureText,
  drainingText,
  language,
  liveText,
  microphoneErrorText,
  reconnectText,
  errorText,
  sessionEndText,
  setLanguage,
  storeLanguage,
  storedLanguage,
  t,
  warningText,
} from '../../web/i18n.js';
import { estimateMouthToEar } from '../../web/lib/latency.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const WEB = join(ROOT, 'web');
const TELUGU = /[\u0C00-\u0C7F]/;
const placeholders = (text) => [...text.matchAll(/\{(\w+)\}/g)].map((m) => m[1]).sort();

/** Every .js file of the page (not the worklets' own helpers only: all of web/). */
function pageScripts(dir = WEB) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return entry.name === 'fonts' ? [] : pageScripts(path);
    return entry.name.endsWith('.js') ? [path] : [];
  });
}

afterEach(() => setLanguage(DEFAULT_LANGUAGE));

describe('string tables', () => {
  test('Telugu is the default and both tables have the same keys', () => {
    assert.equal(DEFAULT_LANGUAGE, 'te');
    assert.deepEqual([...LANGUAGES].sort(), ['en', 'te']);
    assert.deepEqual(Object.keys(STRINGS.te).sort(), Object.keys(STRINGS.en).sort());
  });

  test('every text is non-empty and has the same placeholders in both languages', () => {
    for (const key of Object.keys(STRINGS.en)) {
      for (const lang of LANGUAGES) {
        assert.equal(typeof STRINGS[lang][key], 'string', `${lang} ${key}`);
        assert.ok(STRINGS[lang][key].trim(), `${lang} ${key} is empty`);
      }
      assert.deepEqual(placeholders(STRINGS.te[key]), placeholders(STRINGS.en[key]), key);
    }
  });

  test('the Telugu table is Telugu, the English one is not', () => {
    for (const [key, text] of Object.entries(STRINGS.te)) assert.match(text, TELUGU, `te ${key}: ${text}`);
    for (const [key, text] of Object.entries(STRINGS.en)) {
      // The toggle offers Telugu from the English page in Telugu ('lang.name' is shown in its own language).
      if (key !== 'lang.name') assert.doesNotMatch(text, TELUGU, `en ${key}: ${text}`);
    }
  });

  test("every key the page's scripts and index.html use exists", () => {
    const used = new Set();
    for (const file of pageScripts()) {
      const source = readFileSync(file, 'utf8');
      for (const m of source.matchAll(/\bt\(\s*'([^']+)'/g)) used.add(m[1]);
    }
    const html = readFileSync(join(WEB, 'index.html'), 'utf8');
    for (const m of html.matchAll(/data-i18n(?:-[\w-]+)?="([^"]+)"/g)) used.add(m[1]);
    assert.ok(used.size > 40, `only ${used.size} keys found: the scan is broken`);
    const missing = [...used].filter((key) => !Object.hasOwn(STRINGS.te, key));
    assert.deepEqual(missing, []);
  });

  test('keys made at run time exist: estimate parts, audio parts, every quality warning of the protocol', () => {
    for (const part of estimateMouthToEar({}).parts) assert.ok(Object.hasOwn(STRINGS.te, `part.${part.key}`));
    for (const part of ['capture', 'playback']) assert.ok(Object.hasOwn(STRINGS.te, `audio.${part}`));
    // The warnings the server may send: protocol/messages.py's QualityWarning literal.
    const messages = readFileSync(join(ROOT, 'protocol', 'messages.py'), 'utf8');
    const literal = messages.match(/QualityWarning\s*=\s*Literal\[([^\]]+)\]/);
    assert.ok(literal, 'QualityWarning not found in protocol/messages.py');
    const warnings = [...literal[1].matchAll(/"(\w+)"/g)].map((m) => m[1]);
    assert.ok(warnings.length >= 7, warnings.join());
    for (const warning of warnings) {
      assert.ok(Object.hasOwn(STRINGS.te, `quality.warning.${warning}`), warning);
      for (const lang of LANGUAGES) {
        setLanguage(lang);
        assert.notEqual(warningText(warning), warning);
      }
    }
    assert.equal(warningText('something_new'), 'something_new'); // a newer server's warning shows as its name
  });

  test('every error code and end reason of the protocol reads in both languages, not as its code', () => {
    const codes = readFileSync(join(ROOT, 'protocol', 'codes.py'), 'utf8');
    const block = (name) => codes.split(`class ${name}`)[1].split(/\nclass /)[0];
    const values = (name) => [...block(name).matchAll(/^\s+[A-Z_0-9]+ = "(\w+)"/gm)].map((m) => m[1]);
    const errors = values('ErrorCode');
    const reasons = values('EndReason');
    assert.ok(errors.length >= 15 && reasons.length >= 12, `${errors} / ${reasons}`);
    for (const lang of LANGUAGES) {
      setLanguage(lang);
      for (const code of errors) {
        const text = errorText({ code, msg: 'english from the server' });
        assert.ok(text !== code && !text.includes('english from the server'), `${lang} ${code}`);
      }
      for (const reason of reasons) {
        const text = sessionEndText({ type: 'session_end', reason });
        assert.notEqual(text, t('status.sessionEndReason', { reason }), `${lang} ${reason}: the code itself`);
      }
    }
    setLanguage('te');
    assert.ok(TELUGU.test(errorText({ code: 'idle_timeout', msg: 'no audio' })));
    assert.equal(errorText({ code: 'from_a_newer_server', msg: 'its words' }), 'its words');
  });
});

describe('t()', () => {
  test('fills placeholders in the interface language, or the one asked for', () => {
    assert.equal(language(), 'te');
    assert.equal(t('status.reconnectAttempt', { attempt: 3 }), 'మళ్లీ కనెక్ట్ అవుతోంది… (ప్రయత్నం 3)');
    assert.equal(t('status.reconnectAttempt', { attempt: 3 }, 'en'), 'Reconnecting… (attempt 3)');
    setLanguage('en');
    assert.equal(t('button.start'), 'Start');
    assert.equal(t('no.such.key'), 'no.such.key');
    assert.throws(() => setLanguage('fr'), RangeError);
  });

  test('the choice is stored, and a missing, unknown or refusing store means Telugu', () => {
    const store = new Map();
    const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
    assert.equal(storedLanguage(storage), 'te');
    storeLanguage(storage, 'en');
    assert.equal(store.get(STORAGE_KEY), 'en');
    assert.equal(storedLanguage(storage), 'en');
    store.set(STORAGE_KEY, 'xx');
    assert.equal(storedLanguage(storage), 'te');
    const refusing = {
      getItem: () => {
        throw new Error('SecurityError');
      },
      setItem: () => {
        throw new Error('QuotaExceededError');
      },
    };
    assert.equal(storedLanguage(refusing), 'te');
    assert.doesNotThrow(() => storeLanguage(refusing, 'en'));
    assert.equal(storedLanguage(null), 'te');
  });
});

describe('status line in both languages', () => {
  test('a full server, a restart, a server error and a lost connection are told apart', () => {
    assert.match(reconnectText({ capacity: true, delayMs: 1500 }, 4), /సర్వర్ నిండిపోయింది \(మొత్తం 4 సెషన్లూ/);
    assert.match(reconnectText({ capacity: true, delayMs: 1500 }, 4), /2 సెకన్లలో/);
    assert.match(reconnectText({ code: 1006, delayMs: 200 }), /కనెక్షన్ తెగిపోయింది \(కోడ్ 1006\) — 0\.2 సెకన్లలో/);
    assert.match(reconnectText({ shutdown: true, delayMs: 0 }), /రీస్టార్ట్/);
    setLanguage('en');
    assert.match(reconnectText({ capacity: true, delayMs: 1500 }, 4), /full \(all 4 sessions are busy\) — reconnecting… \(in 2 s\)/);
    assert.match(reconnectText({ capacity: true, delayMs: 1500 }), /^The server is full — /);
    assert.match(reconnectText({ code: 1006, delayMs: 200 }), /Connection lost \(code 1006\) — reconnecting… \(in 0\.2 s\)/);
    assert.match(reconnectText({ serverError: { msg: 'bad frame' }, delayMs: 0 }), /^Server error: bad frame/);
    assert.match(reconnectText({ serverError: { code: 'idle_timeout', msg: 'no audio for 30 s' }, delayMs: 0 }),
      /^Server error: no audio from you for a while/);
  });

  test('live, draining, session end, microphone and audio failures', () => {
    assert.equal(liveText({ model: 'moshi' }), 'moshiకు కనెక్ట్ అయింది — తెలుగులో మాట్లాడండి.');
    assert.match(drainingText({ deadline_s: 29.6 }), /30 సెకన్లలో/);
    assert.equal(sessionEndText({ reason: 'server_shutdown' }), 'సర్వర్ సెషన్‌ను ముగించింది: సర్వర్ ఆగిపోతోంది.');
    assert.match(sessionEndText({ reason: 'from_a_newer_server' }), /from_a_newer_server/);
    assert.match(microphoneErrorText({ name: 'NotAllowedError' }), /అనుమతి నిరాకరించబడింది/);
    assert.match(audioFailureText('capture'), /^మైక్రోఫోన్ ఆడియో/);
    setLanguage('en');
    assert.equal(liveText({ model: 'moshi' }), 'Connected to moshi — speak in Telugu.');
    assert.equal(liveText(null), 'Connected — speak in Telugu.');
    assert.match(drainingText({ deadline_s: 29.6 }), /within 30 s/);
    assert.doesNotMatch(drainingText({}), /within/);
    assert.equal(sessionEndText({}), 'The server ended the session.');
    assert.match(microphoneErrorText({ name: 'NotFoundError' }), /No microphone/);
    assert.match(microphoneErrorText({ name: 'Weird', message: 'boom' }), /: boom$/);
    assert.equal(audioFailureText('playback'), 'The playback audio processing failed. Press Start to try again.');
  });
});
