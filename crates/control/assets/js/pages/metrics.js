// /services and /workloads: golden metrics per row (/api/v1/stat), a sparkline of the last
// ten minutes per row and, for the selected row, charts of requests/s, success rate and
// latency (/api/v1/stat/series).

import { get, getAll } from '/assets/js/api.js';
import { h, replace, table, empty, pill, param, setParams } from '/assets/js/dom.js';
import { rate, pct, ms, successTone } from '/assets/js/format.js';
import { lineChart, sparkline } from '/assets/js/chart.js';

const SERIES = 'window=10m&step=10s';
/** Series change per 10-second step: fetched every third refresh (and on selection). */
const SERIES_EVERY = 3;

function selects(selector, labels) {
  const entries = Object.entries(selector || {});
  return entries.length > 0 && entries.every(([k, v]) => (labels || {})[k] === v);
}

function metricCells(stat) {
  return [
    h('td', { class: 'num', 'data-metric': 'rps' }, stat ? rate(stat.requestsPerSecond) : '—'),
    h('td', { class: `num ${stat ? successTone(stat.successRate) : ''}`, 'data-metric': 'success' }, stat ? pct(stat.successRate) : '—'),
    h('td', { class: 'num' }, stat ? ms(stat.p50Ms) : '—'),
    h('td', { class: 'num' }, stat ? ms(stat.p95Ms) : '—'),
    h('td', { class: 'num' }, stat ? ms(stat.p99Ms) : '—'),
    h('td', { class: 'num' }, stat ? pct(stat.mtlsShare) : '—'),
  ];
}

const METRIC_COLUMNS = [
  { title: 'rps', class: 'num' }, { title: 'success', class: 'num' }, { title: 'p50', class: 'num' },
  { title: 'p95', class: 'num' }, { title: 'p99', class: 'num' }, { title: 'mTLS', class: 'num' }, { title: 'last 10 min' },
];

/** The three charts of one name's series. */
function charts(set, name) {
  const one = set && set.series.find((x) => x.name === name);
  if (!set || !one) return empty('No requests in the last 10 minutes.');
  const times = set.times;
  return h('div', { class: 'charts', 'data-charts': name },
    lineChart({ times, title: 'Requests/s', format: rate, series: [{ values: one.requestsPerSecond, label: 'requests/s' }] }),
    lineChart({
      times, title: 'Success rate', format: pct, yMax: 1,
      yMin: (all) => Math.min(0.9, Math.floor(Math.min(1, ...all) * 20) / 20),
      series: [{ values: one.successRate, label: 'success rate' }],
    }),
    lineChart({ times, title: 'Latency p99 (p50)', format: ms, series: [{ values: one.p99Ms, label: 'p99' }, { values: one.p50Ms, label: 'p50', b: true }] }));
}

/**
 * The page for `kind` (service or workload). `rows(data)` gives [{name, cells: [...] (before
 * the metrics), detail: () => node}] from the fetched data.
 */
function metricsPage({ kind, title, attr, columns, fetchExtra, rows, blurb }) {
  return {
    title,
    mount(root, app) {
      const state = { selected: param('name'), window: ['10s', '1m', '10m'].includes(param('window')) ? param('window') : '1m', series: null, tick: 0, data: null };
      const windowSelect = h('select', { 'aria-label': 'Window', onchange: (e) => { state.window = e.target.value; setParams({ window: state.window === '1m' ? null : state.window }); reload(); } },
        ['10s', '1m', '10m'].map((w) => h('option', { value: w, selected: w === state.window }, w)));
      const body = h('div', {});
      const detail = h('div', {});
      root.append(h('h1', {}, title), h('p', { class: 'muted' }, blurb), h('div', { class: 'toolbar' }, h('label', {}, 'Window', windowSelect)), body, detail);

      const render = () => {
        const data = state.data;
        if (!data) return;
        const list = rows(data);
        if (!list.length) {
          replace(body, empty(`No ${kind}s yet.`));
          replace(detail);
          return;
        }
        const statBy = new Map((data.stat.rows || []).map((r) => [r.name, r]));
        const seriesBy = new Map(((state.series && state.series.series) || []).map((x) => [x.name, x]));
        const trs = list.map((r) => {
          const stat = statBy.get(r.name);
          const series = seriesBy.get(r.name);
          return h('tr', {
            class: `selectable${state.selected === r.name ? ' selected' : ''}`, [attr]: r.name, tabindex: 0,
            onclick: () => select(r.name),
            onkeydown: (e) => { if (e.key === 'Enter') select(r.name); },
          }, r.cells, metricCells(stat),
          h('td', {}, series ? sparkline(series.requestsPerSecond, { label: `${r.name}: requests/s, last 10 minutes` }) : h('span', { class: 'muted' }, '—')));
        });
        replace(body, table([...columns, ...METRIC_COLUMNS], trs, { class: `${kind}s` }));
        const chosen = list.find((r) => r.name === state.selected);
        replace(detail, chosen ? h('div', { class: 'panel', 'data-detail': chosen.name },
          h('h2', {}, chosen.name), chosen.detail ? chosen.detail() : null,
          h('h3', {}, 'Last 10 minutes (10 s steps)'), charts(state.series, chosen.name)) : h('p', { class: 'muted' }, `Select a ${kind} for its charts.`));
      };

      const select = (name) => {
        state.selected = state.selected === name ? null : name;
        setParams({ name: state.selected });
        render();
      };

      const refresh = async () => {
        const wantSeries = state.tick % SERIES_EVERY === 0 || !state.series;
        state.tick += 1;
        const [data, series] = await Promise.all([
          getAll({ stat: `/api/v1/stat?kind=${kind}&window=${state.window}`, ...fetchExtra }),
          wantSeries ? get(`/api/v1/stat/series?kind=${kind}&${SERIES}`) : Promise.resolve(state.series),
        ]);
        state.data = data;
        state.series = series;
        render();
      };
      const reload = () => refresh().then(() => app.updated(), (e) => app.failed(e));
      return { refresh };
    },
  };
}

export const services = metricsPage({
  kind: 'service',
  title: 'Services',
  attr: 'data-service',
  blurb: 'Golden metrics measured where requests arrive (each service\'s own sidecars), or as callers saw them for destinations without a sidecar.',
  columns: [{ title: 'service' }, { title: 'namespace' }, { title: 'workloads', class: 'num' }],
  fetchExtra: { services: '/api/v1/resources/services?namespace=all', workloads: '/api/v1/resources/workloads?namespace=all' },
  rows(data) {
    const byName = new Map();
    for (const svc of data.services.items || []) {
      if (byName.has(svc.metadata.name)) continue; // one row per name: metrics are per name
      const backing = (data.workloads.items || []).filter((w) => (w.metadata.namespace || 'default') === (svc.metadata.namespace || 'default') && selects(svc.spec.selector, w.metadata.labels));
      byName.set(svc.metadata.name, {
        name: svc.metadata.name,
        cells: [h('td', {}, svc.metadata.name), h('td', {}, svc.metadata.namespace || 'default'), h('td', { class: 'num' }, String(backing.length))],
        detail: () => h('div', {},
          h('p', {}, 'Ports: ', (svc.spec.ports || []).map((p) => `${p.port}${p.name ? ` (${p.name})` : ''}${p.appProtocol ? ` ${p.appProtocol}` : ''}`).join(', ') || '—',
            ' · selector: ', Object.entries(svc.spec.selector || {}).map(([k, v]) => `${k}=${v}`).join(', ') || 'none'),
          h('p', {}, 'Workloads: ', backing.length ? backing.map((w, i) => [i ? ', ' : '', h('a', { href: `/workloads?name=${encodeURIComponent(w.metadata.name)}`, 'data-nav': true }, w.metadata.name)]) : 'none')),
      });
    }
    // Destinations with traffic but no Service: outside the mesh.
    for (const r of data.stat.rows || []) {
      if (byName.has(r.name)) continue;
      byName.set(r.name, { name: r.name, cells: [h('td', {}, r.name, ' ', pill('no Service')), h('td', {}, '—'), h('td', { class: 'num' }, '—')] });
    }
    return [...byName.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
  },
});

export const workloads = metricsPage({
  kind: 'workload',
  title: 'Workloads',
  attr: 'data-workload',
  blurb: 'Every registered workload with its sidecar\'s state and the golden metrics of the requests it answered.',
  columns: [{ title: 'workload' }, { title: 'service' }, { title: 'version' }, { title: 'address' }, { title: 'proxy' }],
  fetchExtra: { workloads: '/api/v1/resources/workloads?namespace=all', proxies: '/api/v1/proxies' },
  rows(data) {
    const proxies = new Map((data.proxies.proxies || []).map((p) => [p.workload, p]));
    const out = (data.workloads.items || []).map((w) => {
      const labels = w.metadata.labels || {};
      const p = proxies.get(w.metadata.name);
      const port = (w.spec.ports || [])[0];
      const sync = p ? (p.appliedRevision === p.sentRevision ? pill('in sync', 'ok') : pill(`behind (${p.appliedRevision}/${p.sentRevision})`, 'warn')) : (w.spec.meshed ? pill('no proxy', 'bad') : pill('unmeshed'));
      return {
        name: w.metadata.name,
        cells: [h('td', {}, w.metadata.name), h('td', {}, labels.app || '—'), h('td', {}, labels.version || '—'),
          h('td', { class: 'mono' }, `${w.spec.address || '—'}${port ? `:${port.port}` : ''}`), h('td', {}, sync)],
        detail: () => h('p', {}, `Service account ${w.spec.serviceAccount || '—'} · ${w.spec.meshed ? 'meshed' : 'not meshed'}`,
          p ? ` · ${p.mode} proxy, admin ${p.adminAddress || '—'}, config revision ${p.appliedRevision}` : '',
          p && p.certificate ? ` · certificate ${p.certificate.spiffeId}` : ''),
      };
    });
    // Proxies without a Workload (gateways) still serve traffic.
    for (const p of data.proxies.proxies || []) {
      if (out.some((r) => r.name === p.workload)) continue;
      out.push({
        name: p.workload,
        cells: [h('td', {}, p.workload), h('td', {}, p.service || '—'), h('td', {}, p.version || '—'), h('td', { class: 'mono' }, '—'),
          h('td', {}, p.appliedRevision === p.sentRevision ? pill(`${p.mode}, in sync`, 'ok') : pill(`${p.mode}, behind`, 'warn'))],
      });
    }
    return out.sort((a, b) => (a.name < b.name ? -1 : 1));
  },
});
