// /tap: the live stream of requests the proxies see (/api/v1/tap, newline-delimited JSON),
// newest first, bounded, with filters (sent to the proxies) and pause/resume; plus the
// busiest paths among the requests on screen, as `plexus top` shows them.

import { get, stream, ApiError, Unreachable } from '/assets/js/api.js';
import { h, replace, table, empty, pill, param, setParams } from '/assets/js/dom.js';
import { ms, pct } from '/assets/js/format.js';

/** Rows kept on screen. */
const MAX_ROWS = 300;
/** Wait before reconnecting a stream that ended or broke. */
const RECONNECT_MS = 2000;

const FILTERS = [
  ['method', 'method', 'GET'],
  ['path', 'path prefix', '/productpage'],
  ['status', 'status', '5xx'],
  ['source', 'source', 'productpage'],
];

// Who sent or received a request: the workload when known, else the service, else the
// service account of its mTLS identity (all the inbound side knows of a caller).
function peer(p) {
  if (!p) return '—';
  const known = (v) => v && v !== 'unknown';
  if (known(p.workload)) return p.workload;
  if (known(p.service)) return p.service;
  const sa = (p.principal || '').split('/sa/')[1];
  return sa ? `sa/${sa}` : 'unknown';
}

function time(t) {
  const d = new Date(t);
  if (Number.isNaN(d.getTime())) return t || '—';
  return `${d.toLocaleTimeString('en-GB', { hour12: false })}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

function row(e) {
  const status = e.status ?? '';
  const klass = status ? `status-${String(status)[0]}` : '';
  const dest = e.destination || {};
  return h('tr', { class: 'fresh', 'data-tap-row': true, 'data-status': status, 'data-direction': e.direction },
    h('td', { class: 'mono' }, time(e.time)),
    h('td', {}, e.proxy || '—'),
    h('td', {}, e.direction === 'inbound' ? 'in' : e.direction === 'outbound' ? 'out' : e.direction || '—'),
    h('td', {}, e.method || '—'),
    h('td', { class: 'mono' }, e.authority || '—'),
    h('td', { class: 'mono' }, e.path || '—'),
    h('td', { class: `num ${klass}` }, String(status || '—'), e.grpcStatus !== null && e.grpcStatus !== undefined ? ` (grpc ${e.grpcStatus})` : ''),
    h('td', { class: 'num' }, ms(e.latencyMs)),
    h('td', { title: (e.source || {}).principal || '' }, peer(e.source)),
    h('td', { title: dest.principal || '' }, `${dest.service || 'unknown'}${dest.version ? ` ${dest.version}` : ''}`, dest.endpoint ? h('span', { class: 'muted' }, ` ${dest.endpoint}`) : ''),
    h('td', {}, e.route || '—'),
    h('td', {}, e.tls ? pill('mTLS', 'ok') : pill('plain')),
    h('td', { class: 'num' }, String(e.retries || 0)),
    h('td', { class: 'wrap' }, [e.flags && e.flags !== '-' ? `${e.flags} ` : '', (e.decisions || []).join('; ')].join('')));
}

const COLUMNS = ['time', 'proxy', 'dir', 'method', 'authority', 'path', 'status', 'latency', 'source', 'destination', 'route', 'tls', 'retries', 'decisions']
  .map((t) => ({ title: t, class: ['status', 'latency', 'retries'].includes(t) ? 'num' : undefined }));

export default {
  title: 'Tap',
  mount(root, app) {
    const state = {
      target: param('target') || 'all',
      direction: param('direction') || '',
      filters: Object.fromEntries(FILTERS.map(([k]) => [k, param(k) || ''])),
      paused: false,
      events: [],
      controller: null,
      retry: null,
      mounted: true,
      status: '',
      targets: [],
    };
    const targetSelect = h('select', { 'aria-label': 'Target', onchange: (e) => { state.target = e.target.value; restart(); } });
    const directionSelect = h('select', { 'aria-label': 'Direction', onchange: (e) => { state.direction = e.target.value; restart(); } },
      [['', 'both directions'], ['outbound', 'outbound (as callers saw it)'], ['inbound', 'inbound (as servers saw it)']].map(([v, l]) => h('option', { value: v, selected: v === state.direction }, l)));
    const inputs = FILTERS.map(([k, label, example]) => h('label', {}, label,
      h('input', { type: 'text', name: k, value: state.filters[k], placeholder: example, onchange: (e) => { state.filters[k] = e.target.value.trim(); restart(); } })));
    const pauseButton = h('button', { type: 'button', class: 'primary', onclick: () => { if (state.paused) resume(); else pause(); } }, 'Pause');
    const clearButton = h('button', { type: 'button', onclick: () => { state.events = []; tbody.replaceChildren(); renderTop(); } }, 'Clear');
    const statusLine = h('p', { class: 'muted', 'data-tap-status': true });
    const tbody = h('tbody', {});
    const tableEl = h('div', { class: 'table-wrap tap-wrap' }, h('table', { class: 'tap-table' },
      h('thead', {}, h('tr', {}, COLUMNS.map((c) => h('th', { class: c.class }, c.title)))), tbody));
    const top = h('div', {});
    root.append(h('h1', {}, 'Live tap'),
      h('div', { class: 'toolbar' }, h('label', {}, 'target', targetSelect), directionSelect, inputs, pauseButton, clearButton),
      statusLine, top, h('h2', {}, `Requests (newest first, last ${MAX_ROWS})`), tableEl);

    const setStatus = (text) => { state.status = text; statusLine.textContent = text; };

    const renderTargets = () => {
      const options = [['all', 'the whole mesh'], ...state.targets];
      if (!options.some(([v]) => v === state.target)) options.push([state.target, state.target]);
      replace(targetSelect, options.map(([v, l]) => h('option', { value: v, selected: v === state.target }, l)));
    };

    let topTimer = null;
    const renderTop = () => {
      topTimer = null;
      const by = new Map();
      for (const e of state.events) {
        const key = `${e.method} ${e.authority}${e.path}`;
        const x = by.get(key) || { key, n: 0, ok: 0, lat: [] };
        x.n += 1;
        if ((e.status || 0) < 500 && (e.grpcStatus === null || e.grpcStatus === undefined || e.grpcStatus === 0)) x.ok += 1;
        x.lat.push(e.latencyMs);
        by.set(key, x);
      }
      const rows = [...by.values()].sort((a, b) => b.n - a.n).slice(0, 8);
      replace(top, rows.length ? [h('h2', {}, 'Busiest paths on screen'), table(
        [{ title: 'request' }, { title: 'count', class: 'num' }, { title: 'success', class: 'num' }, { title: 'median', class: 'num' }],
        rows.map((x) => {
          const sorted = x.lat.filter((v) => typeof v === 'number').sort((a, b) => a - b);
          return h('tr', {}, h('td', { class: 'mono' }, x.key), h('td', { class: 'num' }, String(x.n)),
            h('td', { class: 'num' }, pct(x.ok / x.n)), h('td', { class: 'num' }, ms(sorted[Math.floor(sorted.length / 2)])));
        }))] : null);
    };

    const onEvent = (e) => {
      if (state.paused) return;
      state.events.unshift(e);
      if (state.events.length > MAX_ROWS) state.events.length = MAX_ROWS;
      tbody.prepend(row(e));
      while (tbody.children.length > MAX_ROWS) tbody.lastElementChild.remove();
      if (!topTimer) topTimer = setTimeout(renderTop, 1000);
    };

    const query = () => {
      const q = new URLSearchParams({ target: state.target });
      if (state.direction) q.set('direction', state.direction);
      for (const [k, v] of Object.entries(state.filters)) if (v) q.set(k, v);
      return q;
    };

    const start = () => {
      clearTimeout(state.retry);
      if (!state.mounted || state.paused) return;
      const controller = new AbortController();
      state.controller = controller;
      const q = query();
      setParams({ target: state.target === 'all' ? null : state.target, direction: state.direction || null, ...state.filters });
      setStatus(`Connecting to ${state.target}…`);
      stream(`/api/v1/tap?${q}`, {
        signal: controller.signal,
        onEvent: (e) => { if (state.controller === controller) onEvent(e); },
        onOpen: (r) => {
          const n = r.headers.get('x-plexus-tap-proxies');
          setStatus(`Streaming from ${n === null ? 'the' : n} prox${n === '1' ? 'y' : 'ies'} of ${state.target === 'all' ? 'the whole mesh' : state.target}${q.size > 1 ? ' (filtered)' : ''}.`);
          app.updated();
        },
      }).then((outcome) => {
        if (state.controller !== controller) return;
        if (outcome === null) {
          setStatus('');
          replace(tableEl, empty('Live tap is not available on this control plane (no /api/v1/tap).'));
          return;
        }
        if (outcome === 'aborted') return;
        setStatus('The stream ended; reconnecting…');
        state.retry = setTimeout(start, RECONNECT_MS);
      }, (e) => {
        if (state.controller !== controller) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
          setStatus(`The tap was refused: ${e.message}. Change the filters to try again.`);
          return;
        }
        if (e instanceof Unreachable) app.failed(e);
        setStatus(`The stream broke (${e.message}); reconnecting…`);
        state.retry = setTimeout(start, RECONNECT_MS);
      });
    };

    const stop = () => {
      clearTimeout(state.retry);
      if (state.controller) state.controller.abort();
      state.controller = null;
    };
    const pause = () => {
      state.paused = true;
      stop();
      pauseButton.textContent = 'Resume';
      setStatus(`Paused: ${state.events.length} requests on screen.`);
    };
    const resume = () => {
      state.paused = false;
      pauseButton.textContent = 'Pause';
      start();
    };
    const restart = () => {
      stop();
      start();
    };

    // The list of targets follows the connected proxies.
    const refresh = async () => {
      const proxies = await get('/api/v1/proxies');
      const services = [...new Set((proxies.proxies || []).map((p) => p.service).filter(Boolean))].sort();
      const workloads = [...new Set((proxies.proxies || []).map((p) => p.workload).filter(Boolean))].sort();
      const targets = [...services.map((x) => [`service/${x}`, `service ${x}`]), ...workloads.map((x) => [`workload/${x}`, `workload ${x}`])];
      if (JSON.stringify(targets) !== JSON.stringify(state.targets)) {
        state.targets = targets;
        renderTargets();
      }
    };
    renderTargets();
    start();
    return {
      refresh,
      period: 5000,
      unmount() {
        state.mounted = false;
        clearTimeout(topTimer);
        stop();
      },
    };
  },
};
