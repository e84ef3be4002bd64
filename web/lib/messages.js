// What the status line says, for each thing that can happen. Pure functions of plain data, so the wording
// is tested in Node and stays the same wherever it is shown.

export const DEMO_WEIGHTS_NOTICE = 'Demo checkpoint — random weights, output is noise';

/** Text for a failed getUserMedia (a DOMException, or the TypeError of an insecure page). */
export function microphoneErrorMessage(error) {
  const name = error?.name ?? '';
  switch (name) {
    case 'NotAllowedError':
    case 'PermissionDeniedError':
    case 'SecurityError':
      return (
        'Microphone access was denied. Allow the microphone for this site (the icon in the address bar) ' +
        'and press Start again.'
      );
    case 'NotFoundError':
    case 'DevicesNotFoundError':
    case 'OverconstrainedError':
      return 'No microphone was found. Connect one and press Start again.';
    case 'NotReadableError':
    case 'TrackStartError':
    case 'AbortError':
      return 'The microphone could not be opened (is another application using it?). Press Start to retry.';
    case 'InsecureContext':
      return 'The microphone needs a secure page: open this site over https:// or on localhost.';
    default:
      return `Could not start the microphone: ${error?.message || name || String(error)}`;
  }
}

function seconds(ms) {
  return ms < 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

/**
 * Text while waiting to reconnect, from AgentConnection's close detail
 * ({code, reason, capacity, shutdown, delayMs, serverError}) and the server's max_sessions if known.
 */
export function reconnectMessage(detail, maxSessions = null) {
  const wait = `reconnecting… (in ${seconds(detail.delayMs ?? 0)})`;
  if (detail.capacity) {
    const busy = Number.isInteger(maxSessions) ? ` (all ${maxSessions} sessions are busy)` : '';
    return `The server is full${busy} — ${wait}`;
  }
  if (detail.shutdown) return `The server is restarting — ${wait}`;
  const error = detail.serverError;
  if (error && typeof error.msg === 'string' && error.msg) return `Server error: ${error.msg} — ${wait}`;
  const code = Number.isInteger(detail.code) ? ` (code ${detail.code})` : '';
  return `Connection lost${code} — ${wait}`;
}

/** Text once the server has accepted the session. */
export function liveMessage(session) {
  const model = session?.model ? ` to ${session.model}` : '';
  return `Connected${model} — speak in Telugu.`;
}

/** Text when the server starts draining: this conversation may go on a while, then it moves elsewhere. */
export function drainingMessage(message) {
  const deadline = Number(message?.deadline_s);
  const within = Number.isFinite(deadline) && deadline > 0 ? ` within ${Math.round(deadline)} s` : '';
  return `The server is restarting: finish your conversation${within}; the page then reconnects by itself.`;
}

/** Text for a server `session_end` message. */
export function sessionEndMessage(message) {
  const reason = message?.reason ? `: ${message.reason}` : '';
  return `The server ended the session${reason}.`;
}
