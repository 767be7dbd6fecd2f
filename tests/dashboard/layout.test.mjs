// The topology layout on its own (no browser): run with `node --test tests/dashboard/`.
// The browser test measures the rendered page; this one tries many graphs quickly.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { layout, spaceOut } from '../../crates/control/assets/js/layout.js';
import { syntheticGraph } from './synthetic.mjs';

/** Text widths as a proportional font would give them, without a browser. */
const measure = (text, font) => text.length * (font.startsWith('600') ? 7.4 : 5.8);
const edgeLines = (e) => [`${e.requestsPerSecond.toFixed(2)} rps · 100%`, `p99 ${e.p99Ms ?? 0} ms · mTLS 100%`];

const overlap = (a, b) => a.x < b.x + b.w - 0.01 && b.x < a.x + a.w - 0.01 && a.y < b.y + b.h - 0.01 && b.y < a.y + a.h - 0.01;

function problems(g) {
  const out = [];
  const boxes = [...g.nodes.map((n) => ({ ...n, what: `node ${n.id}` })), ...g.edges.map((e) => ({ ...e.label, what: `label ${e.source}->${e.target}` }))];
  for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) if (overlap(boxes[i], boxes[j])) out.push(`${boxes[i].what} overlaps ${boxes[j].what}`);
  }
  for (const b of boxes) {
    if (b.x < 0 || b.y < 0 || b.x + b.w > g.width || b.y + b.h > g.height) out.push(`${b.what} is outside the drawing`);
  }
  return out;
}

test('no box overlaps another in synthetic meshes of 10 to 80 services', () => {
  for (const count of [10, 25, 50, 80]) {
    for (const seed of [1, 2, 3, 42, 1234]) {
      const graph = syntheticGraph(count, seed);
      const g = layout(graph, { measure, edgeLines });
      assert.equal(g.nodes.length, graph.nodes.length);
      assert.equal(g.edges.length, graph.edges.length);
      assert.deepEqual(problems(g), [], `${count} services, seed ${seed}`);
    }
  }
});

test('callers are left of the services they call, except on cycles', () => {
  const g = layout(syntheticGraph(50), { measure, edgeLines });
  const at = new Map(g.nodes.map((n) => [n.id, n]));
  for (const e of g.edges) {
    if (e.back || e.source === e.target) continue;
    assert.ok(at.get(e.source).x + at.get(e.source).w < at.get(e.target).x, `${e.source} -> ${e.target}`);
  }
  const ingress = g.nodes.find((n) => n.data.kind === 'ingress');
  assert.equal(ingress.rank, 0);
  assert.ok(g.edges.some((e) => e.back), 'the synthetic mesh has a cycle');
});

test('bookinfo: ingress, productpage, then details and the reviews versions, then ratings', () => {
  const node = (service, version, kind = 'service') => ({ id: `default/${service}/${version}`, service, version, namespace: 'default', kind });
  const edge = (s, t) => ({ source: `default/${s}`, target: `default/${t}`, requests: 10, requestsPerSecond: 1, successRate: 1, p99Ms: 5, mtlsShare: 1 });
  const graph = {
    nodes: [node('ingress-gateway', 'v1', 'ingress'), node('productpage', 'v1'), node('details', 'v1'), node('reviews', 'v1'), node('reviews', 'v2'), node('reviews', 'v3'), node('ratings', 'v1')],
    edges: [edge('ingress-gateway/v1', 'productpage/v1'), edge('productpage/v1', 'details/v1'), edge('productpage/v1', 'reviews/v1'),
      edge('productpage/v1', 'reviews/v2'), edge('productpage/v1', 'reviews/v3'), edge('reviews/v2', 'ratings/v1'), edge('reviews/v3', 'ratings/v1')],
  };
  const g = layout(graph, { measure, edgeLines });
  const rank = Object.fromEntries(g.nodes.map((n) => [n.id, n.rank]));
  assert.deepEqual(
    [rank['default/ingress-gateway/v1'], rank['default/productpage/v1'], rank['default/details/v1'], rank['default/reviews/v2'], rank['default/ratings/v1']],
    [0, 1, 2, 2, 3]);
  assert.deepEqual(problems(g), []);
  // Every path starts at its source and ends at its target.
  for (const e of g.edges) assert.match(e.path, /^M[\d.]+,[\d.]+/);
});

test('idle services, a self call and an edge to a node the graph does not list', () => {
  const graph = {
    nodes: [{ id: 'a', service: 'a', kind: 'service' }, { id: 'idle', service: 'idle', kind: 'service' }],
    edges: [{ source: 'a', target: 'a', requests: 1, requestsPerSecond: 1, successRate: 1, mtlsShare: 1 },
      { source: 'a', target: 'ghost', requests: 1, requestsPerSecond: 1, successRate: 1, mtlsShare: 1 }],
  };
  const g = layout(graph, { measure, edgeLines });
  assert.deepEqual(g.nodes.map((n) => n.id).sort(), ['a', 'ghost', 'idle']);
  assert.deepEqual(problems(g), []);
  assert.equal(layout({ nodes: [], edges: [] }, { measure, edgeLines }).nodes.length, 0);
});

test('spaceOut keeps order and spacing with the least displacement', () => {
  assert.deepEqual(spaceOut([0, 0, 0], [10, 10, 10], [5, 5]), [-15, 0, 15]);
  assert.deepEqual(spaceOut([0, 100], [10, 10], [5]), [0, 100]);
  assert.deepEqual(spaceOut([], [], []), []);
});
