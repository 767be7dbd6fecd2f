// The JSON API client: every failure becomes an error the app can show, never an uncaught one.

/** The control plane did not answer at all (down, or the network is). */
export class Unreachable extends Error {}

/** The control plane answered with an error status. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const TIMEOUT_MS = 8000;

/**
 * GETs JSON from this origin. With `optional`, a 404 (an API this control plane does not
 * have) gives null instead of an error.
 */
export async function get(path, { optional = false, signal } = {}) {
  const timeout = AbortSignal.timeout(TIMEOUT_MS);
  const combined = signal ? AbortSignal.any([signal, timeout]) : timeout;
  let response;
  try {
    response = await fetch(path, { signal: combined, headers: { accept: 'application/json' } });
  } catch (e) {
    if (signal && signal.aborted) throw e;
    throw new Unreachable(`${path}: ${e.message || e}`);
  }
  if (optional && response.status === 404) return null;
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    if (response.ok) throw new ApiError(response.status, `${path}: the answer is not JSON`);
  }
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.error) || `${path}: ${response.status} ${response.statusText}`);
  }
  return body;
}

/** GETs several paths at once: an object of the same keys. */
export async function getAll(paths, options) {
  const keys = Object.keys(paths);
  const values = await Promise.all(keys.map((k) => {
    const p = paths[k];
    return typeof p === 'string' ? get(p, options) : get(p.path, { ...options, ...p });
  }));
  return Object.fromEntries(keys.map((k, i) => [k, values[i]]));
}

/**
 * Streams newline-delimited JSON: calls onEvent for each object as it arrives; resolves when
 * the stream ends. Answers 404 with null before streaming (no such API).
 */
export async function stream(path, { signal, onEvent, onOpen }) {
  let response;
  try {
    response = await fetch(path, { signal, headers: { accept: 'application/x-ndjson' } });
  } catch (e) {
    if (signal && signal.aborted) return 'aborted';
    throw new Unreachable(`${path}: ${e.message || e}`);
  }
  if (response.status === 404) return null;
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) message = body.error;
    } catch (e) { /* not JSON: keep the status line */ }
    throw new ApiError(response.status, message);
  }
  if (onOpen) onOpen(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, nl).trim();
        buffered = buffered.slice(nl + 1);
        if (!line) continue;
        let event;
        try {
          event = JSON.parse(line);
        } catch (e) {
          continue; // a torn or foreign line is skipped, not fatal
        }
        onEvent(event);
      }
    }
  } catch (e) {
    if (signal && signal.aborted) return 'aborted';
    throw new Unreachable(`${path}: the stream broke (${e.message || e})`);
  }
  return 'ended';
}
