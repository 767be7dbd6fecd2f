// /topology: the live service graph (/api/v1/graph) as SVG, refreshed every two seconds.
// Each node is an element with data-service; each edge carries its numbers as data
// attributes (data-edge="SOURCE->TARGET", data-rps, data-requests, data-success, data-p99,
// data-mtls) as well as in its label.

import { get } from '/assets/js/api.js';
import { h, replace, s, empty, textWidth, param, setParams, table } from '/assets/js/dom.js';
import { rate, pct, ms, count, successTone } from '/assets/js/format.js';
import { layout } from '/assets/js/layout.js';

/** The lines of an edge's label. */
export function edgeLines(e) {
  return [
    `${rate(e.requestsPerSecond)} rps · ${pct(e.successRate)}`,
    `p99 ${ms(e.p99Ms)} · mTLS ${pct(e.mtlsShare)}`,
  ];
}

function segmented(options, value, onChange) {
  return h('span', { class: 'segmented', role: 'group' }, options.map(([v, label]) =>
    h('button', { type: 'button', 'aria-pressed': String(v === value), 'data-value': v, onclick: () => onChange(v) }, label)));
}

/** The inbound success rate of a node: how its callers fared. */
function health(id, edges) {
  let requests = 0;
  let ok = 0;
  for (const e of edges) {
    if (e.target !== id) continue;
    requests += e.requests;
    ok += e.successRate * e.requests;
  }
  return requests ? ok / requests : null;
}

/** Draws a laid-out graph. */
function draw(g, graph, selected, onSelect) {
  const svg = s('svg', {
    class: 'topology', width: g.width, height: g.height, viewBox: `0 0 ${g.width} ${g.height}`,
    role: 'img', 'aria-label': `Service graph: ${g.nodes.length} nodes, ${g.edges.length} edges`,
    'data-window': graph.window, 'data-group': graph.group,
  });
  // One arrowhead per edge colour, sized in pixels (not by the edge's width).
  const tones = ['ok', 'degraded', 'failing', 'idle'];
  svg.append(s('defs', {}, tones.map((t) => s('marker', {
    id: `arrow-${t}`, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 9, markerHeight: 9, markerUnits: 'userSpaceOnUse', orient: 'auto',
  }, s('path', { class: `arrow ${t}`, d: 'M0,0 L10,5 L0,10 z' })))));
  const edgeLayer = s('g', { class: 'edges' });
  const labelLayer = s('g', { class: 'edge-labels' });
  const nodeLayer = s('g', { class: 'nodes' });
  svg.append(edgeLayer, nodeLayer, labelLayer);
  const maxRps = Math.max(0.001, ...graph.edges.map((e) => e.requestsPerSecond));
  for (const e of g.edges) {
    const d = e.data;
    const key = `${d.source}->${d.target}`;
    const tone = successTone(d.requests ? d.successRate : null);
    const dim = selected && d.source !== selected && d.target !== selected;
    const attrs = {
      'data-edge': key, 'data-source': d.source, 'data-target': d.target,
      'data-rps': d.requestsPerSecond, 'data-requests': d.requests, 'data-success': d.successRate,
      'data-p99': d.p99Ms ?? '', 'data-mtls': d.mtlsShare,
    };
    const widthPx = 1.2 + 3.5 * (Math.log1p(d.requestsPerSecond) / Math.log1p(maxRps));
    const look = { ok: 'ok', warn: 'degraded', bad: 'failing' }[tone] || 'idle';
    edgeLayer.append(s('g', { class: `edge ${look}${dim ? ' dim' : ''}`, ...attrs },
      s('path', { d: e.path, 'stroke-width': widthPx.toFixed(2), 'marker-end': `url(#arrow-${look})` }),
      s('title', {}, `${d.source} → ${d.target}\n${count(d.requests)} requests in ${graph.window}`)));
    const l = e.label;
    const label = s('g', { class: `edge-label${dim ? ' dim' : ''}`, 'data-edge': key, transform: `translate(${l.x.toFixed(1)},${l.y.toFixed(1)})` },
      s('rect', { width: l.w, height: l.h, rx: 3 }));
    l.lines.forEach((line, i) => label.append(s('text', { x: l.w / 2, y: 4 + 10 + i * 12, 'text-anchor': 'middle' }, line)));
    labelLayer.append(label);
  }
  for (const n of g.nodes) {
    const d = n.data;
    const ok = health(n.id, graph.edges);
    const tone = successTone(ok);
    const cls = ['node', d.kind || 'service', tone === 'warn' ? 'degraded' : tone === 'bad' ? 'failing' : '', selected === n.id ? 'selected' : '']
      .filter(Boolean).join(' ');
    const node = s('g', {
      class: cls, transform: `translate(${n.x.toFixed(1)},${n.y.toFixed(1)})`, tabindex: 0, role: 'button',
      'data-service': d.service, 'data-node-id': n.id, 'data-kind': d.kind, 'data-version': d.version || '',
      onclick: () => onSelect(n.id),
      onkeydown: (ev) => { if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); onSelect(n.id); } },
    },
    s('rect', { width: n.w, height: n.h, rx: 6 }),
    s('text', { class: 'name', x: n.w / 2, y: n.lines[1] ? 16 : 23, 'text-anchor': 'middle' }, n.lines[0]),
    n.lines[1] ? s('text', { class: 'sub', x: n.w / 2, y: 30, 'text-anchor': 'middle' }, n.lines[1]) : null,
    s('title', {}, `${n.id}${ok !== null ? `\nsuccess ${pct(ok)} (inbound)` : ''}`));
    nodeLayer.append(node);
  }
  return svg;
}

function detail(graph, id) {
  const node = graph.nodes.find((n) => n.id === id);
  if (!node) return null;
  const row = (e, other) => h('tr', {},
    h('td', {}, other), h('td', { class: 'num' }, rate(e.requestsPerSecond)), h('td', { class: `num ${successTone(e.successRate)}` }, pct(e.successRate)),
    h('td', { class: 'num' }, ms(e.p50Ms)), h('td', { class: 'num' }, ms(e.p99Ms)), h('td', { class: 'num' }, pct(e.mtlsShare)));
  const cols = (first) => [{ title: first }, { title: 'rps', class: 'num' }, { title: 'success', class: 'num' },
    { title: 'p50', class: 'num' }, { title: 'p99', class: 'num' }, { title: 'mTLS', class: 'num' }];
  const inbound = graph.edges.filter((e) => e.target === id);
  const outbound = graph.edges.filter((e) => e.source === id);
  const link = node.kind === 'service' ? h('a', { href: `/services?name=${encodeURIComponent(node.service)}`, 'data-nav': true }, 'golden metrics and charts') : null;
  return h('div', { class: 'panel node-detail' },
    h('h2', {}, `${node.service}${node.version ? ` ${node.version}` : ''} `, h('span', { class: 'muted' }, `(${node.kind}${node.namespace ? `, ${node.namespace}` : ''})`)),
    link ? h('p', {}, link) : null,
    h('h3', {}, 'Called by'), inbound.length ? table(cols('from'), inbound.map((e) => row(e, e.source))) : empty('No callers in this window.'),
    h('h3', {}, 'Calls'), outbound.length ? table(cols('to'), outbound.map((e) => row(e, e.target))) : empty('Calls nothing in this window.'));
}

export default {
  title: 'Topology',
  mount(root, app) {
    const state = {
      group: param('group') === 'service' ? 'service' : 'version',
      window: ['10s', '1m', '10m'].includes(param('window')) ? param('window') : '1m',
      fit: param('fit') === '1',
      selected: param('node'),
      graph: null,
    };
    const controls = h('div', { class: 'toolbar' });
    const wrap = h('div', { class: 'graph-wrap' });
    const info = h('div', {});
    const summary = h('p', { class: 'muted' });
    root.append(h('h1', {}, 'Topology'), controls, summary, wrap, info);

    const render = () => {
      replace(controls,
        h('label', {}, 'Nodes', segmented([['version', 'per version'], ['service', 'per service']], state.group, (v) => { state.group = v; setParams({ group: v === 'version' ? null : v }); reload(); })),
        h('label', {}, 'Window', segmented([['10s', '10s'], ['1m', '1m'], ['10m', '10m']], state.window, (v) => { state.window = v; setParams({ window: v === '1m' ? null : v }); reload(); })),
        h('label', {}, h('input', { type: 'checkbox', checked: state.fit, onchange: (ev) => { state.fit = ev.target.checked; setParams({ fit: state.fit ? '1' : null }); render(); } }), 'fit to width'));
      wrap.classList.toggle('fit', state.fit);
      const graph = state.graph;
      if (!graph) return;
      if (!graph.nodes.length) {
        replace(wrap, empty('No proxies are connected and no traffic was reported in this window.'));
        replace(summary);
        replace(info);
        return;
      }
      const laid = layout(graph, { measure: textWidth, edgeLines });
      const select = (id) => {
        state.selected = state.selected === id ? null : id;
        setParams({ node: state.selected });
        render();
      };
      const scroll = [wrap.scrollLeft, wrap.scrollTop];
      replace(wrap, draw(laid, graph, state.selected, select));
      [wrap.scrollLeft, wrap.scrollTop] = scroll;
      const rps = graph.edges.filter((e) => e.source === 'unknown' || graph.nodes.find((n) => n.id === e.source)?.kind === 'ingress')
        .reduce((a, e) => a + e.requestsPerSecond, 0);
      replace(summary, `${graph.nodes.length} nodes, ${graph.edges.length} edges over the last ${graph.window}; ${rate(rps)} rps entering the mesh. Select a node for its callers and calls.`);
      replace(info, state.selected ? detail(graph, state.selected) : null);
    };

    const refresh = async () => {
      const graph = await get(`/api/v1/graph?window=${state.window}&group=${state.group}`);
      state.graph = graph;
      render();
    };
    // A control changed: fetch at once rather than at the next tick.
    const reload = () => refresh().then(() => app.updated(), (e) => app.failed(e));
    render();
    return { refresh };
  },
};
