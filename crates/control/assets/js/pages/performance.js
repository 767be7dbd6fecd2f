// /performance: stored `plexus bench` runs (/api/v1/bench/results), each run's latency
// distribution from its histogram, and two runs side by side.

import { get } from '/assets/js/api.js';
import { h, replace, table, empty, pill, param, setParams, changes } from '/assets/js/dom.js';
import { ms, rate, count, datetime } from '/assets/js/format.js';
import { histogram } from '/assets/js/chart.js';

const PERCENTILES = ['min', 'mean', 'p50', 'p75', 'p90', 'p99', 'p99.9', 'p99.99', 'max'];

function delta(a, b) {
  if (typeof a !== 'number' || typeof b !== 'number' || a === 0) return '';
  const d = ((b - a) / a) * 100;
  return `${d > 0 ? '+' : ''}${d.toFixed(1)}%`;
}

/** Latency percentiles of a run's details (falling back to its SMP summary). */
function percentiles(run) {
  const l = (run.details && run.details.latencyMs) || {};
  const smp = (run.result && run.result.latenciesMs) || {};
  return Object.fromEntries(PERCENTILES.map((p) => [p, l[p] ?? (p === 'mean' ? smp.average : smp[p])]));
}

function errorsOf(run) {
  const e = run.details && run.details.errors;
  if (!e || !Object.keys(e).length) return 'none';
  return Object.entries(e).map(([k, n]) => `${k} ${count(n)}`).join(', ');
}

function runInfo(item, run) {
  const d = (run && run.details) || {};
  return h('dl', { class: 'kv' }, [
    ['target', h('span', { class: 'mono' }, item.url || d.url || '—')],
    ['protocol', `${item.protocol || d.protocol || '—'} · ${item.mode || d.mode || '—'}${d.corrected ? ' (corrected for coordinated omission)' : ''}`],
    ['rate', `${rate(item.actualQPS)} achieved${item.requestedQPS ? ` of ${rate(item.requestedQPS)} requested` : ''}`],
    ['connections', d.connections !== undefined ? `${d.connections}${d.streamsPerConnection > 1 ? ` × ${d.streamsPerConnection} streams` : ''}` : '—'],
    ['duration', d.durationSeconds !== undefined ? `${d.durationSeconds}s (warm-up ${d.warmupSeconds || 0}s)` : '—'],
    ['requests', d.completed !== undefined ? `${count(d.completed)} completed, ${count(d.unsent || 0)} unsent` : '—'],
    ['errors', run ? errorsOf(run) : count(item.errors)],
  ].flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

export default {
  title: 'Performance',
  mount(root, app) {
    const state = { items: null, open: param('run'), compare: (param('compare') || '').split(',').filter(Boolean).slice(0, 2), runs: new Map() };
    const list = h('div', {});
    const detail = h('div', {});
    root.append(h('h1', {}, 'Performance runs'),
      h('p', { class: 'muted' }, 'Results of plexus bench stored by the control plane. Select a run for its latency distribution; tick two to compare them.'),
      list, detail);
    const changed = changes();

    const run = async (id) => {
      if (!state.runs.has(id)) state.runs.set(id, await get(`/api/v1/bench/results/${encodeURIComponent(id)}`));
      return state.runs.get(id);
    };

    const renderDetail = async () => {
      const items = state.items || [];
      const byId = new Map(items.map((i) => [i.id, i]));
      if (state.compare.length === 2 && state.compare.every((id) => byId.has(id))) {
        const [a, b] = await Promise.all(state.compare.map(run));
        const [ia, ib] = state.compare.map((id) => byId.get(id));
        const pa = percentiles(a);
        const pb = percentiles(b);
        replace(detail, h('div', { class: 'panel', 'data-compare': state.compare.join(',') },
          h('h2', {}, 'Comparison'),
          h('div', { class: 'legend' }, h('span', {}, h('span', { class: 'swatch' }), `A: ${ia.name || ia.id}`), h('span', {}, h('span', { class: 'swatch b' }), `B: ${ib.name || ib.id}`)),
          histogram([{ label: 'A', buckets: ((a.details || {}).histogram || {}).buckets }, { label: 'B', buckets: ((b.details || {}).histogram || {}).buckets, b: true }], { title: 'Latency distribution (share of requests)' }),
          table([{ title: '' }, { title: 'A', class: 'num' }, { title: 'B', class: 'num' }, { title: 'B vs A', class: 'num' }], [
            h('tr', {}, h('td', {}, 'achieved rps'), h('td', { class: 'num' }, rate(ia.actualQPS)), h('td', { class: 'num' }, rate(ib.actualQPS)), h('td', { class: 'num' }, delta(ia.actualQPS, ib.actualQPS))),
            ...PERCENTILES.map((p) => h('tr', {}, h('td', {}, p), h('td', { class: 'num' }, ms(pa[p])), h('td', { class: 'num' }, ms(pb[p])), h('td', { class: 'num' }, delta(pa[p], pb[p])))),
            h('tr', {}, h('td', {}, 'errors'), h('td', { class: 'num' }, count(ia.errors)), h('td', { class: 'num' }, count(ib.errors)), h('td', {}, '')),
          ]),
          h('div', { class: 'split' }, h('div', {}, h('h3', {}, 'A'), runInfo(ia, a)), h('div', {}, h('h3', {}, 'B'), runInfo(ib, b)))));
        return;
      }
      const item = state.open && byId.get(state.open);
      if (!item) {
        replace(detail, items.length ? h('p', { class: 'muted' }, 'Select a run for its latency distribution.') : null);
        return;
      }
      const r = await run(item.id);
      const p = percentiles(r);
      replace(detail, h('div', { class: 'panel', 'data-run-detail': item.id },
        h('h2', {}, item.name || item.id, ' ', h('span', { class: 'muted' }, datetime(item.startTime))),
        histogram([{ label: item.name || item.id, buckets: ((r.details || {}).histogram || {}).buckets }], { title: 'Latency distribution (share of requests)' }),
        table(PERCENTILES.map((x) => ({ title: x, class: 'num' })), [h('tr', {}, PERCENTILES.map((x) => h('td', { class: 'num' }, ms(p[x]))))]),
        runInfo(item, r)));
    };

    const renderList = () => {
      const items = state.items;
      if (items === null) {
        replace(list, empty('Performance results are not available on this control plane (no /api/v1/bench/results).'));
        replace(detail);
        return;
      }
      if (!items.length) {
        replace(list, empty('No runs yet. Run plexus bench URL against a mesh service; its result is stored here.'));
        replace(detail);
        return;
      }
      const toggle = (id, on) => {
        state.compare = on ? [...state.compare.filter((x) => x !== id), id].slice(-2) : state.compare.filter((x) => x !== id);
        setParams({ compare: state.compare.join(',') || null });
        renderList();
        renderDetail().catch((e) => app.failed(e));
      };
      const open = (id) => {
        state.open = state.open === id ? null : id;
        state.compare = [];
        setParams({ run: state.open, compare: null });
        renderList();
        renderDetail().catch((e) => app.failed(e));
      };
      replace(list, table(
        [{ title: 'compare' }, { title: 'run' }, { title: 'started' }, { title: 'target' }, { title: 'protocol' }, { title: 'rps', class: 'num' },
          { title: 'p50', class: 'num' }, { title: 'p90', class: 'num' }, { title: 'p99', class: 'num' }, { title: 'max', class: 'num' }, { title: 'errors', class: 'num' }],
        items.map((i) => {
          const l = i.latenciesMs || {};
          return h('tr', { class: `selectable${state.open === i.id ? ' selected' : ''}`, 'data-run': i.id, onclick: (e) => { if (!(e.target instanceof HTMLInputElement)) open(i.id); } },
            h('td', {}, h('input', { type: 'checkbox', 'aria-label': `compare ${i.name || i.id}`, checked: state.compare.includes(i.id), onchange: (e) => toggle(i.id, e.target.checked) })),
            h('td', {}, i.name || i.id.slice(0, 8)), h('td', {}, datetime(i.startTime)), h('td', { class: 'mono' }, i.url || '—'),
            h('td', {}, `${i.protocol || '—'}${i.mode ? ` · ${i.mode}` : ''}`),
            h('td', { class: 'num' }, rate(i.actualQPS), i.requestedQPS ? h('span', { class: 'muted' }, ` / ${rate(i.requestedQPS)}`) : ''),
            h('td', { class: 'num' }, ms(l.p50)), h('td', { class: 'num' }, ms(l.p90)), h('td', { class: 'num' }, ms(l.p99)), h('td', { class: 'num' }, ms(l.max)),
            h('td', { class: 'num' }, i.errors ? pill(count(i.errors), 'bad') : '0'));
        })));
    };

    const refresh = async () => {
      const body = await get('/api/v1/bench/results', { optional: true });
      const items = body ? body.items || [] : null;
      if (!changed(items)) return;
      state.items = items;
      renderList();
      await renderDetail();
    };
    return { refresh, period: 5000 };
  },
};
