// Every text the interface shows, in Telugu (the default) and English, and the status line's wording in both.
// Pure: no DOM; the view applies it (`data-i18n` attributes in index.html, `t()` in view.js and app.js).
// Model text (the transcript) is not interface text: it stays Telugu whatever the interface language.
//
// `t(key, params)` fills `{name}` placeholders from `params`. Both tables have the same keys and the same
// placeholders per key (tests/web/i18n.test.mjs checks that, and that every key the page uses exists).

export const LANGUAGES = Object.freeze(['te', 'en']);
export const DEFAULT_LANGUAGE = 'te';
/** localStorage key of the reader's choice, kept across visits. */
export const STORAGE_KEY = 'voice-agent.lang';

const te = {
  'lang.name': 'తెలుగు',
  'lang.offer': 'ఈ పేజీని తెలుగులో చూపించండి',
  'app.title': 'తెలుగు వాయిస్ ఏజెంట్',
  'app.hint':
    'ఎప్పుడైనా మాట్లాడండి — ఏజెంట్ తాను మాట్లాడుతున్నప్పుడు కూడా వింటుంది. ఇకో రాకుండా హెడ్‌ఫోన్లు వాడండి.',
  'controls.label': 'సెషన్',
  'button.start': 'ప్రారంభించండి',
  'button.stop': 'ఆపండి',
  'status.idle': '“ప్రారంభించండి” నొక్కి, మైక్రోఫోన్‌ను అనుమతించండి.',
  'status.asking': 'మైక్రోఫోన్ అనుమతి అడుగుతోంది…',
  'status.stopped': 'ఆపేశాం. మళ్లీ మాట్లాడాలంటే “ప్రారంభించండి” నొక్కండి.',
  'status.connecting': 'కనెక్ట్ అవుతోంది…',
  'status.reconnectAttempt': 'మళ్లీ కనెక్ట్ అవుతోంది… (ప్రయత్నం {attempt})',
  'status.open': 'కనెక్ట్ అయింది — సర్వర్ సెషన్ ప్రారంభించే వరకు ఆగుతోంది…',
  'status.live': 'కనెక్ట్ అయింది — తెలుగులో మాట్లాడండి.',
  'status.liveModel': '{model}కు కనెక్ట్ అయింది — తెలుగులో మాట్లాడండి.',
  'status.soundHint': 'సౌండ్ ఆన్ చేయడానికి పేజీలో ఎక్కడైనా క్లిక్ చేయండి.',
  'status.resumed': 'మళ్లీ కనెక్ట్ అయింది — సంభాషణ కొనసాగుతోంది.',
  'status.newConversation':
    'మళ్లీ కనెక్ట్ అయింది, కానీ పాత సంభాషణను కొనసాగించలేకపోయాం — కొత్త సంభాషణ మొదలైంది.',
  'status.draining':
    'సర్వర్ రీస్టార్ట్ అవుతోంది: మీ సంభాషణను ముగించండి; తర్వాత పేజీ తానే మళ్లీ కనెక్ట్ అవుతుంది.',
  'status.drainingWithin':
    'సర్వర్ రీస్టార్ట్ అవుతోంది: మీ సంభాషణను {seconds} సెకన్లలో ముగించండి; తర్వాత పేజీ తానే మళ్లీ కనెక్ట్ అవుతుంది.',
  'status.sessionEnd': 'సర్వర్ సెషన్‌ను ముగించింది.',
  'status.sessionEndReason': 'సర్వర్ సెషన్‌ను ముగించింది: {reason}.',
  'status.audioFailed':
    '{part} ఆడియో ప్రాసెసింగ్ విఫలమైంది. మళ్లీ ప్రయత్నించడానికి “ప్రారంభించండి” నొక్కండి.',
  'audio.capture': 'మైక్రోఫోన్',
  'audio.playback': 'ప్లేబ్యాక్',
  'reconnect.wait': '{seconds} సెకన్లలో మళ్లీ కనెక్ట్ అవుతుంది…',
  'reconnect.full': 'సర్వర్ నిండిపోయింది — {wait}',
  'reconnect.fullOf': 'సర్వర్ నిండిపోయింది (మొత్తం {max} సెషన్లూ బిజీగా ఉన్నాయి) — {wait}',
  'reconnect.restarting': 'సర్వర్ రీస్టార్ట్ అవుతోంది — {wait}',
  'reconnect.serverError': 'సర్వర్ లోపం: {msg} — {wait}',
  'error.idle_timeout': 'చాలాసేపు మీ ఆడియో రాలేదు, అందుకే సెషన్ మూసివేయబడింది',
  'error.time_limit': 'సెషన్ సమయ పరిమితి ముగిసింది',
  'error.internal': 'సర్వర్‌లో అంతర్గత లోపం వచ్చింది',
  'error.shutdown': 'సర్వర్ ఆగిపోతోంది',
  'error.bad_request': 'సర్వర్ ఈ అభ్యర్థనను అంగీకరించలేదు',
  'error.rate_limited': 'ఆడియో మరీ వేగంగా వస్తోంది',
  'error.capacity': 'సర్వర్ నిండిపోయింది',
  'error.malformed': 'సర్వర్ ఈ పేజీ పంపినదాన్ని చదవలేకపోయింది',
  'error.resume_failed': 'పాత సంభాషణను కొనసాగించలేకపోయాం, కొత్త సంభాషణ మొదలైంది',
  'end.client_request': 'మీరు ముగించారు',
  'end.client_closed': 'కనెక్షన్ మూసివేయబడింది',
  'end.connection_lost': 'కనెక్షన్ తెగిపోయింది',
  'end.server_shutdown': 'సర్వర్ ఆగిపోతోంది',
  'end.protocol_error': 'చదవలేని సందేశాలు చాలా వచ్చాయి',
  'end.capacity': 'సర్వర్ మెమరీ సరిపోలేదు',
  'end.idle_timeout': 'చాలాసేపు మీ ఆడియో రాలేదు',
  'end.time_limit': 'సెషన్ సమయ పరిమితి ముగిసింది',
  'end.rate_limited': 'ఆడియో మరీ వేగంగా వచ్చింది',
  'end.internal': 'సర్వర్‌లో అంతర్గత లోపం',
  'end.message_too_big': 'సందేశం మరీ పెద్దది',
  'end.invalid_utf8': 'చదవలేని టెక్స్ట్ సందేశం',
  'end.keepalive_timeout': 'పేజీ నుండి స్పందన రాలేదు',
  'end.reconnecting': 'సంభాషణను కొనసాగించడానికి పేజీ మళ్లీ కనెక్ట్ అవుతోంది',
  'reconnect.lost': 'కనెక్షన్ తెగిపోయింది — {wait}',
  'reconnect.lostCode': 'కనెక్షన్ తెగిపోయింది (కోడ్ {code}) — {wait}',
  'mic.denied':
    'మైక్రోఫోన్ అనుమతి నిరాకరించబడింది. ఈ సైట్‌కు మైక్రోఫోన్‌ను అనుమతించి (అడ్రస్ బార్‌లోని గుర్తు), మళ్లీ “ప్రారంభించండి” నొక్కండి.',
  'mic.notFound': 'మైక్రోఫోన్ కనిపించలేదు. ఒకటి కనెక్ట్ చేసి మళ్లీ “ప్రారంభించండి” నొక్కండి.',
  'mic.notReadable':
    'మైక్రోఫోన్‌ను తెరవలేకపోయాం (వేరే అప్లికేషన్ దాన్ని వాడుతోందా?). మళ్లీ ప్రయత్నించడానికి “ప్రారంభించండి” నొక్కండి.',
  'mic.insecure':
    'మైక్రోఫోన్‌కు సురక్షితమైన పేజీ కావాలి: ఈ సైట్‌ను https:// ద్వారా గానీ localhost లో గానీ తెరవండి.',
  'mic.other': 'మైక్రోఫోన్‌ను ప్రారంభించలేకపోయాం: {detail}',
  'demo.notice': 'డెమో చెక్‌పాయింట్ — రాండమ్ వెయిట్లు, వచ్చే ఆడియో కేవలం నాయిస్',
  'conversation.heading': 'సంభాషణ',
  'speaking.yes': 'మీరు: మాట్లాడుతున్నారు',
  'speaking.no': 'మీరు: మౌనంగా ఉన్నారు',
  'transcript.label': 'ఏజెంట్ మాటలు',
  'transcript.empty': 'ఏజెంట్ మాటలు ఇక్కడ కనిపిస్తాయి.',
  'latency.heading': 'జాప్యం (లేటెన్సీ)',
  'latency.rtt': 'నెట్‌వర్క్ రౌండ్ ట్రిప్',
  'latency.rttWaiting': 'సెకనుకు ఒకసారి ping/pong',
  'latency.rttDetail': 'సగటు · కనిష్ఠం {min} · చివరిది {last}',
  'latency.server': 'సర్వర్ ప్రాసెసింగ్',
  'latency.serverParts':
    'క్యూ {queue} · స్టెప్ {step} · రీశాంప్లింగ్ {resample} · ప్రసారం {transport} · p99 {p99} · వదిలేసినవి {dropped}',
  'latency.buffer': 'ప్లేబ్యాక్ బఫర్',
  'latency.bufferDetail': 'లక్ష్యం {target} · అంతరాయాలు {underruns} · ప్లే అయిన ఫ్రేమ్‌లు {played}',
  'latency.total': 'నోటి నుంచి చెవి వరకు (అంచనా)',
  'latency.parts': 'అంచనాలోని భాగాలు',
  'part.capture': 'క్యాప్చర్ బఫరింగ్',
  'part.network': 'నెట్‌వర్క్ (RTT/2 × 2)',
  'part.server': 'సర్వర్ ప్రాసెసింగ్',
  'part.model': 'మోడల్ జాప్యం',
  'part.playback': 'ప్లేబ్యాక్ బఫర్',
  'part.output': 'ఆడియో అవుట్‌పుట్',
  'info.summary': 'సెషన్ వివరాలు',
  'info.session': 'సెషన్',
  'info.model': 'మోడల్',
  'info.codec': 'ఆడియో కోడెక్',
  'info.frames': 'పంపిన / అందిన / ప్లే అయిన ఫ్రేమ్‌లు',
  'info.reconnects': 'మళ్లీ కనెక్ట్ అయినవి',
  'info.rates': 'ఆడియో రేట్లు (క్యాప్చర్ / ప్లేబ్యాక్)',
  'quality.heading': 'ఆడియో నాణ్యత',
  'quality.level': 'మైక్రోఫోన్ స్థాయి',
  'quality.levelMeter': 'మైక్రోఫోన్ స్థాయి మీటర్',
  'quality.levelDetail': 'గరిష్ఠం {peak} · క్లిప్పింగ్ {clipped}',
  'quality.snr': 'సిగ్నల్/నాయిస్ (SNR)',
  'quality.loss': 'పోయిన ఆడియో',
  'quality.spikes': 'జాప్యం స్పైక్‌లు',
  'quality.drops': 'వదిలేసిన అవుట్‌పుట్',
  'quality.warnings': 'సూచనలు',
  'quality.ok': 'సమస్యలు లేవు.',
  'quality.warning.clipping':
    'మీ మైక్రోఫోన్ క్లిప్ అవుతోంది — వాల్యూమ్ తగ్గించండి, లేదా మైక్‌ను కాస్త దూరంగా పెట్టండి.',
  'quality.warning.quiet':
    'మీ గొంతు చాలా తక్కువగా వినిపిస్తోంది — మైక్‌కు దగ్గరగా మాట్లాడండి, లేదా వాల్యూమ్ పెంచండి.',
  'quality.warning.noisy':
    'చుట్టూ శబ్దం ఎక్కువగా ఉంది — నిశ్శబ్దమైన చోటుకు వెళ్లండి, లేదా హెడ్‌సెట్ మైక్ వాడండి.',
  'quality.warning.input_loss':
    'నెట్‌వర్క్ మీ ఆడియోను కోల్పోతోంది — మెరుగైన కనెక్షన్‌కు మారండి (Wi‑Fi కి దగ్గరగా వెళ్లండి).',
  'quality.warning.output_drops': 'ఏజెంట్ ఆడియో మీకు సమయానికి అందడం లేదు — ఇతర డౌన్‌లోడ్‌లు, వీడియోలు ఆపండి.',
  'quality.warning.latency_spikes':
    'జవాబులు అప్పుడప్పుడు ఆలస్యం అవుతున్నాయి — నెట్‌వర్క్ స్థిరంగా లేదు; వీలైతే వేరే కనెక్షన్ వాడండి.',
  'quality.warning.playback_gaps':
    'ఏజెంట్ మాటల్లో ఖాళీలు వస్తున్నాయి — కనెక్షన్ నెమ్మదిగా ఉంది; వేరే నెట్‌వర్క్ ప్రయత్నించండి.',
};

const en = {
  'lang.name': 'English',
  'lang.offer': 'Show this page in English',
  'app.title': 'Telugu voice agent',
  'app.hint':
    'Full-duplex: speak whenever you like, the agent listens while it talks. Headphones avoid echo.',
  'controls.label': 'Session',
  'button.start': 'Start',
  'button.stop': 'Stop',
  'status.idle': 'Press Start and allow the microphone.',
  'status.asking': 'Asking for the microphone…',
  'status.stopped': 'Stopped. Press Start to talk again.',
  'status.connecting': 'Connecting…',
  'status.reconnectAttempt': 'Reconnecting… (attempt {attempt})',
  'status.open': 'Connected — waiting for the server to start the session…',
  'status.live': 'Connected — speak in Telugu.',
  'status.liveModel': 'Connected to {model} — speak in Telugu.',
  'status.soundHint': 'Click anywhere on the page to turn the sound on.',
  'status.resumed': 'Reconnected — the conversation continues.',
  'status.newConversation':
    'Reconnected, but the conversation could not be continued — a new conversation has started.',
  'status.draining':
    'The server is restarting: finish your conversation; the page then reconnects by itself.',
  'status.drainingWithin':
    'The server is restarting: finish your conversation within {seconds} s; the page then reconnects by itself.',
  'status.sessionEnd': 'The server ended the session.',
  'status.sessionEndReason': 'The server ended the session: {reason}.',
  'status.audioFailed': 'The {part} audio processing failed. Press Start to try again.',
  'audio.capture': 'capture',
  'audio.playback': 'playback',
  'reconnect.wait': 'reconnecting… (in {seconds} s)',
  'reconnect.full': 'The server is full — {wait}',
  'reconnect.fullOf': 'The server is full (all {max} sessions are busy) — {wait}',
  'reconnect.restarting': 'The server is restarting — {wait}',
  'reconnect.serverError': 'Server error: {msg} — {wait}',
  'error.idle_timeout': 'no audio from you for a while, so the session was closed',
  'error.time_limit': 'the session reached its time limit',
  'error.internal': 'the server had an internal error',
  'error.shutdown': 'the server is stopping',
  'error.bad_request': 'the server refused this request',
  'error.rate_limited': 'audio is arriving too fast',
  'error.capacity': 'the server is full',
  'error.malformed': 'the server could not read what this page sent',
  'error.resume_failed': 'the conversation could not be continued, a new one has started',
  'end.client_request': 'you ended it',
  'end.client_closed': 'the connection was closed',
  'end.connection_lost': 'the connection was lost',
  'end.server_shutdown': 'the server is stopping',
  'end.protocol_error': 'too many unreadable messages',
  'end.capacity': 'the server ran out of memory',
  'end.idle_timeout': 'no audio from you for a while',
  'end.time_limit': 'the session reached its time limit',
  'end.rate_limited': 'audio arrived too fast',
  'end.internal': 'the server had an internal error',
  'end.message_too_big': 'a message was too big',
  'end.invalid_utf8': 'an unreadable text message',
  'end.keepalive_timeout': 'the page stopped answering',
  'end.reconnecting': 'the page is reconnecting to continue the conversation',
  'reconnect.lost': 'Connection lost — {wait}',
  'reconnect.lostCode': 'Connection lost (code {code}) — {wait}',
  'mic.denied':
    'Microphone access was denied. Allow the microphone for this site (the icon in the address bar) and ' +
    'press Start again.',
  'mic.notFound': 'No microphone was found. Connect one and press Start again.',
  'mic.notReadable':
    'The microphone could not be opened (is another application using it?). Press Start to retry.',
  'mic.insecure': 'The microphone needs a secure page: open this site over https:// or on localhost.',
  'mic.other': 'Could not start the microphone: {detail}',
  'demo.notice': 'Demo checkpoint — random weights, output is noise',
  'conversation.heading': 'Conversation',
  'speaking.yes': 'You: speaking',
  'speaking.no': 'You: silent',
  'transcript.label': "Agent's words",
  'transcript.empty': "The agent's words appear here.",
  'latency.heading': 'Latency',
  'latency.rtt': 'Network round trip',
  'latency.rttWaiting': 'ping/pong once a second',
  'latency.rttDetail': 'smoothed · min {min} · last {last}',
  'latency.server': 'Server processing',
  'latency.serverParts':
    'queue {queue} · step {step} · resample {resample} · transport {transport} · p99 {p99} · dropped {dropped}',
  'latency.buffer': 'Playback buffer',
  'latency.bufferDetail': 'target {target} · underruns {underruns} · played {played} frames',
  'latency.total': 'Mouth-to-ear (estimate)',
  'latency.parts': 'Parts of the estimate',
  'part.capture': 'capture buffering',
  'part.network': 'network (RTT/2 × 2)',
  'part.server': 'server processing',
  'part.model': 'model algorithmic',
  'part.playback': 'playback buffer',
  'part.output': 'audio output',
  'info.summary': 'Session details',
  'info.session': 'Session',
  'info.model': 'Model',
  'info.codec': 'Audio codec',
  'info.frames': 'Frames sent / received / played',
  'info.reconnects': 'Reconnects',
  'info.rates': 'Audio rates (capture / playback)',
  'quality.heading': 'Audio quality',
  'quality.level': 'Microphone level',
  'quality.levelMeter': 'Microphone level meter',
  'quality.levelDetail': 'peak {peak} · clipped {clipped}',
  'quality.snr': 'Signal-to-noise (SNR)',
  'quality.loss': 'Audio lost',
  'quality.spikes': 'Latency spikes',
  'quality.drops': 'Output dropped',
  'quality.warnings': 'Advice',
  'quality.ok': 'No problems.',
  'quality.warning.clipping':
    'Your microphone is clipping — turn the volume down, or move the microphone a little away.',
  'quality.warning.quiet':
    'Your voice is very quiet — speak closer to the microphone, or turn the volume up.',
  'quality.warning.noisy':
    'There is a lot of background noise — move somewhere quieter, or use a headset microphone.',
  'quality.warning.input_loss':
    'The network is losing your audio — move to a better connection (closer to the Wi‑Fi).',
  'quality.warning.output_drops':
    "The agent's audio is not reaching you in time — pause other downloads and videos.",
  'quality.warning.latency_spikes':
    'Replies are sometimes delayed — the network is unsteady; use another connection if you can.',
  'quality.warning.playback_gaps':
    "The agent's speech has gaps — the connection is slow; try another network.",
};

export const STRINGS = Object.freeze({ te: Object.freeze(te), en: Object.freeze(en) });

let current = DEFAULT_LANGUAGE;

/** The interface language now: 'te' or 'en'. */
export function language() {
  return current;
}

export function setLanguage(lang) {
  if (!LANGUAGES.includes(lang)) throw new RangeError(`unknown language ${lang}`);
  current = lang;
}

/** The language the interface is not in (what the toggle offers). */
export function otherLanguage(lang = current) {
  return lang === 'te' ? 'en' : 'te';
}

/** The text for `key` in `lang` (the interface language by default), `{name}` filled from `params`. */
export function t(key, params = {}, lang = current) {
  const template = (STRINGS[lang] ?? STRINGS[DEFAULT_LANGUAGE])[key];
  if (template === undefined) return key; // a missing key shows itself rather than breaking the page
  return template.replace(/\{(\w+)\}/g, (whole, name) =>
    Object.hasOwn(params, name) ? String(params[name]) : whole,
  );
}

/** The reader's saved choice, or Telugu. `storage` is localStorage (which may be absent or refuse). */
export function storedLanguage(storage) {
  try {
    const value = storage?.getItem(STORAGE_KEY);
    return LANGUAGES.includes(value) ? value : DEFAULT_LANGUAGE;
  } catch {
    return DEFAULT_LANGUAGE;
  }
}

export function storeLanguage(storage, lang) {
  try {
    storage?.setItem(STORAGE_KEY, lang);
  } catch {
    // Private modes may refuse storage: the choice then lasts for this visit only.
  }
}

// --- the status line's wording, in the interface language -------------------------------------------

/** Text for a failed getUserMedia (a DOMException, or the TypeError of an insecure page). */
export function microphoneErrorText(error) {
  const name = error?.name ?? '';
  switch (name) {
    case 'NotAllowedError':
    case 'PermissionDeniedError':
    case 'SecurityError':
      return t('mic.denied');
    case 'NotFoundError':
    case 'DevicesNotFoundError':
    case 'OverconstrainedError':
      return t('mic.notFound');
    case 'NotReadableError':
    case 'TrackStartError':
    case 'AbortError':
      return t('mic.notReadable');
    case 'InsecureContext':
      return t('mic.insecure');
    default:
      return t('mic.other', { detail: error?.message || name || String(error) });
  }
}

function seconds(ms) {
  return ms < 1000 ? (ms / 1000).toFixed(1) : String(Math.round(ms / 1000));
}

/**
 * Text while waiting to reconnect, from AgentConnection's close detail
 * ({code, reason, capacity, shutdown, delayMs, serverError}) and the server's max_sessions if known.
 */
export function reconnectText(detail, maxSessions = null) {
  const wait = t('reconnect.wait', { seconds: seconds(detail.delayMs ?? 0) });
  if (detail.capacity) {
    return Number.isInteger(maxSessions)
      ? t('reconnect.fullOf', { max: maxSessions, wait })
      : t('reconnect.full', { wait });
  }
  if (detail.shutdown) return t('reconnect.restarting', { wait });
  const error = detail.serverError;
  if (error && typeof error.msg === 'string' && error.msg) {
    return t('reconnect.serverError', { msg: errorText(error), wait });
  }
  return Number.isInteger(detail.code)
    ? t('reconnect.lostCode', { code: detail.code, wait })
    : t('reconnect.lost', { wait });
}

/** Text once the server has accepted the session. */
export function liveText(session) {
  return session?.model ? t('status.liveModel', { model: session.model }) : t('status.live');
}

/** Text when the server starts draining: this conversation may go on a while, then it moves elsewhere. */
export function drainingText(message) {
  const deadline = Number(message?.deadline_s);
  return Number.isFinite(deadline) && deadline > 0
    ? t('status.drainingWithin', { seconds: Math.round(deadline) })
    : t('status.draining');
}

/** Text for a server `session_end` message. */
export function sessionEndText(message) {
  const reason = message?.reason;
  if (!reason) return t('status.sessionEnd');
  const key = `end.${reason}`;
  return t('status.sessionEndReason', { reason: hasKey(key) ? t(key) : String(reason) });
}

/** A server `error` in the interface's language: its code's text; a newer server's code, its own msg. */
export function errorText(error) {
  const code = String(error?.code ?? '');
  const malformed = MALFORMED_CODES.includes(code);
  if (malformed) return t('error.malformed');
  const key = `error.${code}`;
  return hasKey(key) ? t(key) : String(error?.msg ?? code);
}

// The codes of a message the page sent that the server could not read: the ones it raises as ProtocolError
// (protocol/codes.py; tests/test_web_constants.py checks the list against the server's).
export const MALFORMED_CODES = Object.freeze(['empty_frame', 'bad_header', 'bad_length', 'bad_audio', 'oversize',
  'bad_utf8', 'bad_json', 'unknown_type', 'bad_field']);

function hasKey(key) {
  return Object.hasOwn(STRINGS[current] ?? STRINGS.te, key);
}

/** Text for a worklet failure; `part` is 'capture' or 'playback'. */
export function audioFailureText(part) {
  const name = part === 'capture' || part === 'playback' ? t(`audio.${part}`) : String(part);
  return t('status.audioFailed', { part: name });
}

/** Advice for one quality warning (SessionQuality.warnings); an unknown one shows as its name. */
export function warningText(warning) {
  const key = `quality.warning.${warning}`;
  return Object.hasOwn(STRINGS[current], key) ? t(key) : String(warning);
}
